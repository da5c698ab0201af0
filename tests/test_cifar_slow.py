"""Acceptance check on real data: the guide's CNN on CIFAR-10 (50k/10k JPEGs) at 32 px with the
standard augmentation for 15 epochs reaches >= 0.65 test accuracy. Slow (a few minutes): run with
`pytest -m slow`."""

import json
import tarfile
from pathlib import Path

import pytest

from conftest import run_cli

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason="CIFAR-10 archive not available")
def test_seed_cnn_cifar10_15_epochs(tmp_path):
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    proc = run_cli("train", tmp_path / "cifar10", "--model", "classic-cnn", "--image-size", "32", "--augment", "standard", "--epochs", "15",
                   "--out", tmp_path / "run", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"]["accuracy"] >= 0.65
