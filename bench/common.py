"""Helpers shared by the benchmarks: data extraction, timing commands, parsing peers' RESULT lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def extract(archive: Path, dest: Path) -> Path:
    """Extract a dataset archive once into `dest` (an ignored or temporary folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / f".{archive.name}.done"
    if not marker.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        marker.touch()
    return dest


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, str]:
    """Wall time of a whole command (start-up included) and its stdout+stderr."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def result_fields(output: str) -> dict:
    """key=value pairs of a peer's final `RESULT ...` line."""
    line = [l for l in output.splitlines() if l.startswith("RESULT")][-1]
    return {k: v for k, v in re.findall(r"(\w+)=([\w.]+)", line)}


def pixclass_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pixclass", *map(str, args)]


def print_json(result: dict, path: Path | None = None) -> None:
    """A bench's result as indented JSON on stdout, and into `path` (its --json) when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.write_text(text)
