"""Checkpoints: written atomically (temporary file, then rename) so a kill mid-write leaves the
previous one intact, and read with `weights_only=True` so loading never runs pickled code.
(No fsync: the rename is atomic for a killed process, which is what a checkpoint guards against
here; flushing to the disk on every write cost more than a whole epoch on cached features.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError, first_line


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path}: {first_line(e)}") from None
