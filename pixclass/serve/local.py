"""`pixclass serve` started as a child process on a free local port, for the tests and the load
benchmark."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def start_local(model_dir, *args, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) once /readyz answers 200, or after `timeout_s` (the caller's requests
    then show what went wrong)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pixclass", "serve", str(model_dir), "--port", str(port),
                             *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return proc, base
