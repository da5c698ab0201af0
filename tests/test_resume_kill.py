"""Kill -9 a training run at random moments (many of them during checkpoint writes), resume each
time, and get bitwise the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import make_shapes, run_cli


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pixclass", "train", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_soon(proc: subprocess.Popen, ckpt: Path, rng: random.Random) -> bool:
    """Wait until the run writes checkpoints, then kill -9 it a random moment later.
    Returns False if the run finished first."""
    start = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and ckpt.stat().st_mtime_ns != start:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.25))
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def test_kill_nine_ten_times_then_resume_is_bitwise_identical(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=40)
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  path: {data}\n  image_size: 32\nmodel:\n  name: seed-cnn\naugment:\n  policy: standard\n"
                      "train:\n  epochs: 24\n  batch_size: 8\n  checkpoint_interval: 0\n  seed: 3\n")
    clean = run_cli("train", "--config", config, "--out", tmp_path / "clean", "-q")
    assert clean.returncode == 0, clean.stderr

    run, rng = tmp_path / "killed", random.Random(1234)
    ckpt = run / "checkpoints" / "last.pt"
    kills, torn_writes = 0, 0
    while kills < 10:
        proc = _start("--resume", run, "-q") if ckpt.exists() else _start("--config", config, "--out", run, "-q")
        if not _kill_soon(proc, ckpt, rng):
            break
        kills += 1
        torn_writes += any(p.suffix == ".tmp" for p in (run / "checkpoints").iterdir())
    assert kills == 10, "the run finished before it could be killed ten times"
    final = run_cli("train", "--resume", run, "-q")
    assert final.returncode == 0, final.stderr

    a = load_file(tmp_path / "clean" / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = torch.load(tmp_path / "clean" / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    assert last_a["step"] == last_b["step"]
    print(f"10 kills, {torn_writes} of them left a half-written checkpoint behind")
