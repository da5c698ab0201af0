"""Run folders: runs/<name>, runs/<name>-2, ... so an earlier run is never overwritten."""

from __future__ import annotations

from pathlib import Path


def new_run_dir(name: str, base: Path = Path("runs")) -> Path:
    stem = Path(name).name or "run"
    candidate, i = base / stem, 2
    while candidate.exists():
        candidate, i = base / f"{stem}-{i}", i + 1
    return candidate
