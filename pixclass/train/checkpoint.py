"""Checkpoints: written atomically (temporary file, then rename) so a kill mid-write leaves the
previous one intact, and read with `weights_only=True` so loading never runs pickled code.
(No fsync: the rename is atomic for a killed process, which is what a checkpoint guards against
here; flushing to the disk on every write cost more than a whole epoch on cached features.)

A write that fails (a full disk, a quota, an I/O error) removes its temporary file, which would
otherwise hold the disk full, and raises a `RunFolderWriteError`: the run stops with one line
and keeps the last checkpoint that was written whole."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError, first_line


class RunFolderWriteError(UserError):
    """A file of the run folder could not be written; the previous version of it is kept."""


class _ErrorKeepingWriter:
    """The file handed to torch.save: torch reports a failed write as a RuntimeError about stream
    positions ("[enforce fail at inline_container.cc]"), dropping the OSError behind it; this
    keeps that OSError so the message can say "no space left on device"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def replace_atomically(path: Path, write: Callable) -> None:
    """Call `write(file)` on a temporary file beside `path` (binary; only `write` and `flush`),
    then rename it over `path`. On any failure, Ctrl-C included, the temporary file is removed and
    `path` keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _ErrorKeepingWriter(f)
            write(writer)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(e, (OSError, RuntimeError)) and isinstance(cause, OSError):  # not a RuntimeError of torch's own
            kept = "its previous version is kept" if path.exists() else "no partial file is left"
            raise RunFolderWriteError(f"{describe_os_error(cause)} while writing {path} ({kept})") from e
        raise


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


def describe_os_error(e: BaseException) -> str:
    """"no space left on device", "read-only file system", ...: the reason, without the path."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return first_line(e)

