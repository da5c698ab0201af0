"""Optional extras (`pip install 'pixclass[tflite]'`, `'pixclass[coreml]'`, `'pixclass[track]'`):
imported only when a command needs them, quietly, and with a one-line install hint when missing.
Shared by the exporters, the LiteRT inference backend and experiment tracking."""

from __future__ import annotations

from contextlib import contextmanager

from .errors import UserError


@contextmanager
def captured_output():
    """File descriptors 1 and 2 go to a temp file (yielded) for the duration: converters print
    progress and C++ logs straight to them, which would also spoil --json output."""
    import os
    import sys
    import tempfile
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def require(module: str, extra: str, what: str = "this export"):
    """Import `module` from an optional extra, or a UserError naming the pip extra to install
    (`what` says what needed it)."""
    import importlib
    try:
        with captured_output():  # their import-time warnings and logs are noise to a user
            return importlib.import_module(module)
    except ImportError:
        raise _missing(module, extra, what) from None


def require_installed(module: str, extra: str, what: str) -> None:
    """`require`'s UserError when `module` is not installed, found without importing it: a check
    made before work begins, for a library imported later (and only where it is used)."""
    import importlib.util
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise _missing(module, extra, what)


def _missing(module: str, extra: str, what: str) -> UserError:
    return UserError(f"{what} needs {module.split('.')[0]}: pip install 'pixclass[{extra}]'")
