"""Checkpoints: replaced whole (`atomic_write`), so a kill or a full disk mid-write leaves the
previous one intact and the run stops with one line, and read with `weights_only=True` so loading
never runs pickled code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic_write import replace_atomically
from ..errors import UserError, first_line


def save_checkpoint(state: dict, path: Path) -> None:
    replace_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path}: {first_line(e)}") from None
