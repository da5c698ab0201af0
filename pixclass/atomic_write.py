"""Files replaced whole: written to a temporary file beside the target, then renamed over it, so
a kill or a full disk mid-write leaves the previous version intact. (No fsync: the rename is
atomic for a killed process, which is what these writes guard against; flushing to the disk on
every checkpoint cost more than a whole epoch on cached features.)

A write that fails (a full disk, a quota, an I/O error) removes its temporary file, which would
otherwise hold the disk full, and raises a `FileWriteError`: one line that names the file and the
reason."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from .errors import UserError, first_line


class FileWriteError(UserError):
    """A file could not be written; its previous version, if any, is kept."""


class _ErrorKeepingWriter:
    """The file handed to `write`: libraries such as torch report a failed write as an error of
    their own ("[enforce fail at inline_container.cc]"), dropping the OSError behind it; this
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
        if isinstance(e, (OSError, RuntimeError)) and isinstance(cause, OSError):  # not a library's own RuntimeError
            kept = "its previous version is kept" if path.exists() else "no partial file is left"
            raise FileWriteError(f"{describe_os_error(cause)} while writing {path} ({kept})") from e
        raise


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text.encode()))


def describe_os_error(e: BaseException) -> str:
    """"no space left on device", "read-only file system", ...: the reason, without the path."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return first_line(e)
