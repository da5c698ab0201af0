"""Moving files between class folders on the user's decision (`pixclass audit DATA --fix relabel
DECISIONS.csv`), and moving them back (`--undo LOG`).

A relabel never deletes and never overwrites: a file whose name is taken in the new class folder
gets a free name (name.relabel-1.jpg, ...). Every move (and every class folder it had to create)
is appended to a log beside the dataset, written as it happens, so an interrupted relabel can be
undone too; undo replays the log backwards and restores the tree exactly, then renames the log
to LOG.undone so it cannot be replayed twice."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

from ..errors import UserError
from .scan import is_hidden, split_folders

ACCEPT = {"y", "yes", "1", "true", "x", "accept", "accepted"}
LOG_FIELDS = ["action", "source", "destination"]


def read_decisions(path: Path) -> list[tuple[Path, str]]:
    """(file, new class) of the accepted rows of a decisions CSV: the columns `path` and
    `suggested` (as `audit --labels` writes them in label_issues.csv; edit `suggested` to choose
    another class), and where there is an `accept` column, only the rows marked y/yes/1/x/true."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"decisions file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"path", "suggested"} <= columns:
            raise UserError(f"{path} needs the columns path and suggested (and optionally accept); "
                            f"it has {', '.join(sorted(columns)) or 'none'}")
        rows = list(reader)
    if "accept" in columns:
        rows = [r for r in rows if (r.get("accept") or "").strip().lower() in ACCEPT]
    return [(Path(r["path"]), r["suggested"].strip()) for r in rows]


def _class_folder_of(root: Path, file: Path) -> tuple[Path, Path]:
    """(the folder holding the file's class folders: DATA or DATA/<split>, the file's path below
    its class folder)."""
    rel = file.resolve().relative_to(root.resolve()) if file.is_absolute() else file
    tops = split_folders(root)
    if "train" in tops and len(rel.parts) >= 3 and rel.parts[0] in {t.name for t in tops.values()}:
        return root / rel.parts[0], Path(*rel.parts[2:])
    if len(rel.parts) < 2:
        raise UserError(f"{file} is not in a class folder of {root}")
    return root, Path(*rel.parts[1:])


def _free_name(target: Path) -> Path:
    """`target`, or where its name is taken, name.relabel-N.ext with the first free N."""
    free, n = target, 0
    while free.exists() or free.is_symlink():
        n += 1
        free = target.with_name(f"{target.stem}.relabel-{n}{target.suffix}")
    return free


def _plan(root: Path, decisions: list[tuple[Path, str]]) -> list[tuple[Path, Path]]:
    """(source, class folder to move it into) for each decision, every one checked first: a bad
    row stops the relabel before any file moves."""
    plan = []
    for file, new_class in decisions:
        file = file if file.is_absolute() else root / file
        if not file.is_file() and not file.is_symlink():
            raise UserError(f"{file} (in the decisions) does not exist; nothing was moved")
        try:
            top, below = _class_folder_of(root, file)
        except ValueError:
            raise UserError(f"{file} is not inside {root}; nothing was moved") from None
        tops = split_folders(root)
        classes = {d.name for t in (tops.values() if "train" in tops else [root]) for d in t.iterdir()
                   if d.is_dir() and not is_hidden(d)}
        if not new_class or new_class not in classes or "/" in new_class or new_class.startswith("."):
            raise UserError(f"{new_class!r} (for {file}) is not a class of {root}; nothing was moved")
        plan.append((file, top / new_class / below))
    return plan


def relabel(root, decisions: list[tuple[Path, str]], log: Path | None = None) -> tuple[Path, int]:
    """Move each file into its new class folder; returns (the log, the number of files moved).
    Files already in the class they are given stay where they are."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    plan = [(src, dst) for src, dst in _plan(root, decisions) if src.parent != dst.parent]
    log = Path(log) if log else root.with_name(f"{root.name}.relabel-{time.strftime('%Y%m%d-%H%M%S')}.csv")
    if log.resolve().is_relative_to(root.resolve()):
        raise UserError("the relabel log must be outside the dataset")
    moved = 0
    with open(log, "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOG_FIELDS)

        def record(*row):
            writer.writerow([str(x) for x in row])
            f.flush()
            os.fsync(f.fileno())

        for src, dst in plan:
            for folder in reversed([p for p in [dst.parent, *dst.parent.parents] if not p.exists()]):
                folder.mkdir()
                record("mkdir", "", folder)
            dst = _free_name(dst)
            os.rename(src, dst)  # within one dataset: one file system, atomic, never over a file (checked)
            record("move", src, dst)
            moved += 1
    return log, moved


def undo(log: Path) -> int:
    """Replay a relabel log backwards: every file back where it was, every folder the relabel
    created removed. Returns the number of files moved back."""
    log = Path(log)
    if not log.is_file():
        raise UserError(f"relabel log not found: {log}")
    with open(log, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != LOG_FIELDS:
            raise UserError(f"{log} is not a relabel log (columns {', '.join(LOG_FIELDS)})")
        rows = list(reader)
    for row in rows:  # checked first: an undo that would overwrite or miss a file moves nothing
        if row["action"] == "move":
            src, dst = Path(row["source"]), Path(row["destination"])
            if src.exists() or src.is_symlink():
                raise UserError(f"cannot undo: {src} exists again (it would be overwritten); nothing was moved")
            if not dst.exists() and not dst.is_symlink():
                raise UserError(f"cannot undo: {dst} is gone; nothing was moved")
    moved = 0
    for row in reversed(rows):
        if row["action"] == "move":
            os.rename(row["destination"], row["source"])
            moved += 1
        elif row["action"] == "mkdir":
            folder = Path(row["destination"])
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    log.rename(log.with_name(log.name + ".undone"))
    return moved
