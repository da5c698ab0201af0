"""Where pixclass keeps what it can recompute: decoded images and backbone features, each
entry keyed by file contents and the settings that produced it (so a stale entry is never used)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PIXCLASS_CACHE_DIR") or Path.home() / ".cache" / "pixclass")


def digest(*parts) -> str:
    """A short hex digest of bytes and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
