"""Run folders: runs/<name>, runs/<name>-2, ... so an earlier run is never overwritten.

A folder is claimed at the moment it is chosen, by an operation the file system performs atomically:
creating the folder (`mkdir` fails when it exists) and, for a training run, creating its claim file
(config.yaml) with O_EXCL. Checking `exists()` first and writing later lets two processes started
together pick the same folder; with the claim only one of them can get it, the other moves on to
the next name or, for a folder the user named, stops with one line."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


def check_output_location(out: Path | None, option: str = "--out", folder: Path | None = None) -> None:
    """Refuse, before any expensive work, an output that cannot be written: `out` naming an existing
    file, or below a file, or in a folder this user cannot write to. `folder`: where `out` goes
    when it is a file (its parent); by default `out` is itself the folder to create."""
    if out is None:
        return
    out = Path(out).expanduser()
    if folder is None and out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is an existing file; give a folder")
    start = out if folder is None else Path(folder)
    nearest = next((p for p in (start, *start.absolute().parents) if p.exists()), None)
    if nearest is None:  # nothing of the path exists, not even the root: let the write say why
        return
    if not nearest.is_dir():
        raise UserError(f"{option} {out}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write in {nearest} (read-only or no permission)")


CLAIM_FILE = "config.yaml"  # a training run's folder belongs to the process that created this file


@dataclass
class ClaimedFolder:
    """A run folder this process owns. `created`: this process made the folder (else it was given
    an empty one), so releasing it removes the folder too."""
    path: Path
    created: bool
    claim: str | None

    def release(self, written: tuple[str, ...] = ()) -> None:
        """Give the folder back after a run that stopped before it trained: remove the claim file
        and the `written` files, then the folder if this process made it and nothing else is in it."""
        for name in (self.claim, *written):
            if name:
                (self.path / name).unlink(missing_ok=True)
        if self.created:
            try:
                self.path.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                pass


def new_run_dir(name: str, base: Path = Path("runs"), claim: str | None = None) -> Path:
    """A new folder base/<name> (or <name>-2, <name>-3, ... when taken), created here and so owned
    by this process; with `claim`, that file is created in it too (see `claim_new_folder`)."""
    return claim_new_folder(name, base, claim).path


def claim_new_folder(name: str, base: Path = Path("runs"), claim: str | None = None) -> ClaimedFolder:
    stem = Path(name).name or "run"
    _make_parents(base, base / stem)
    for i in itertools.count(1):
        candidate = base / (stem if i == 1 else f"{stem}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create the run folder {candidate}: {_reason(e)}") from None
        # a process given this very folder as its --out can have claimed it since our mkdir
        if claim is None or _create_exclusively(candidate / claim):
            return ClaimedFolder(candidate, True, claim)


def claim_folder(path: Path, claim: str = CLAIM_FILE) -> ClaimedFolder:
    """Claim a folder the user named: created (with its parents) when missing, accepted when it is
    an empty folder, refused (UserError) when it is a file, holds anything already (an earlier
    run, or files of the user's), or another process claims it first."""
    path = Path(path)
    _make_parents(path.parent, path)
    created = True
    try:
        path.mkdir()
    except FileExistsError:
        created = False
        if not path.is_dir():
            raise UserError(f"the run folder {path} is a file; give --out a new or empty folder") from None
    except OSError as e:
        raise UserError(f"cannot create the run folder {path}: {_reason(e)}") from None
    if not created and any(path.iterdir()):
        raise _taken(path, claim)
    if not _create_exclusively(path / claim):
        raise _taken(path, claim)
    return ClaimedFolder(path, created, claim)


def _taken(path: Path, claim: str) -> UserError:
    if not (path / claim).exists():
        return UserError(f"the run folder {path} is not empty; give --out a new or empty folder")
    hint = "choose another --out"
    if (path / "checkpoints" / "last.pt").is_file() and not (path / "model").exists():
        hint += f", continue it with --resume {path}"
    if (path / "manifest.csv").is_file():
        hint += f", or keep its split with --manifest {path / 'manifest.csv'}"
    return UserError(f"the run folder {path} already holds a run ({claim}); {hint}")


def _create_exclusively(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError as e:
        raise UserError(f"cannot write in the run folder {path.parent}: {_reason(e)}") from None
    return True


def _make_parents(folder: Path, run_dir: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder should be (exist_ok only forgives folders)
        raise UserError(f"cannot create the run folder {run_dir}: {folder} is a file") from None
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir}: {_reason(e)}") from None


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__
