"""DistributedDataParallel on CPU: two gloo processes with half the batch each end where one
process with the whole batch ends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, subset

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="module")
def cifar_2000(cifar_train_400, tmp_path_factory):
    return subset(cifar_train_400, tmp_path_factory.mktemp("cifar2000") / "train", per_class=200).parent


@pytest.mark.ddp
@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 archive not available")
def test_two_gloo_processes_match_one_process(cifar_2000, tmp_path):
    # Two processes sum the batch in another order than one, so the weights differ by float noise
    # (1e-8 after a step). A gentle optimizer keeps it there; Adam at 1e-3 or SGD at 0.05 amplify it
    # over the epoch's 32 steps to ~1e-3 (measured), as any chaotic training would.
    args = ["train", cifar_2000, "--model", "seed-cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "64", "--augment", "standard",
            "--optimizer", "sgd", "--lr", "0.01",
            "--split", "1,0,0", "--seed", "7", "-q"]
    one = run_cli(*args, "--out", tmp_path / "one", "--threads", "1")
    assert one.returncode == 0, one.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    two = subprocess.run([sys.executable, "-m", "pixclass", *map(str, args), "--out", str(tmp_path / "two"),
                          "--nproc", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-4, diff
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # one epoch, logged once (by rank 0)
    one_row, two_row = (p.read_text().splitlines()[1].split(",") for p in (tmp_path / "one" / "metrics.csv",
                                                                          tmp_path / "two" / "metrics.csv"))
    assert abs(float(one_row[3]) - float(two_row[3])) < 1e-3  # train loss reduced over both ranks
