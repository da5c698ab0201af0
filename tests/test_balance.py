"""The imbalance autopilot: when it turns on, what it changes in training, and what it says."""

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import make_shapes, run_cli
from pixclass.config import TrainConfig
from pixclass.data.loaders import epoch_order
from pixclass.errors import ConfigError, UserError
from pixclass.train.balance import resolve_balance

CLASSES = ["a", "b"]


def test_auto_turns_on_at_the_threshold_only():
    assert resolve_balance("auto", [0] * 20 + [1] * 10, CLASSES).mode == "off"
    on = resolve_balance("auto", [0] * 30 + [1] * 10, CLASSES)
    assert on.mode == "weights" and on.ratio == 3.0 and on.monitor("val_loss") == "val_macro_f1"
    assert on.class_weights == pytest.approx((40 / 60, 40 / 20))  # n / (classes x n_c): a balanced split gets 1s
    assert "3.0:1" in on.description and "macro-F1" in on.description


def test_modes_named_by_the_user():
    labels = [0] * 40 + [1] * 2
    assert resolve_balance("sampler", labels, CLASSES).mode == "sampler"
    assert resolve_balance("weights", [0, 1], CLASSES).mode == "weights"  # forced even when balanced
    off = resolve_balance("off", labels, CLASSES)
    assert off.mode == "off" and off.monitor("val_loss") == "val_loss" and "--balance off" in off.description
    with pytest.raises(UserError):
        resolve_balance("oversample", labels, CLASSES)


def test_the_sampler_draws_each_class_about_equally():
    labels = torch.tensor([0] * 950 + [1] * 50)
    weights = resolve_balance("sampler", labels.tolist(), CLASSES).sample_weights(labels)
    drawn = labels[epoch_order(len(labels), True, torch.Generator().manual_seed(0), weights)]
    assert 0.4 < drawn.float().mean().item() < 0.6
    # and the draw is the generator's: a resumed epoch redraws the same order
    again = labels[epoch_order(len(labels), True, torch.Generator().manual_seed(0), weights)]
    assert torch.equal(drawn, again)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced") / "shapes"
    make_shapes(root, per_class=60, classes=("circle",))
    make_shapes(root, per_class=10, classes=("square",), seed=1)
    return root


@pytest.mark.parametrize("recipe, balance", [("scratch", "auto"), ("fast", "sampler")])
def test_training_says_what_it_did_in_the_log_and_the_report(imbalanced, tmp_path, recipe, balance):
    model = ["--model", "classic-cnn"] if recipe == "scratch" else ["--recipe", "fast"]
    proc = run_cli("train", imbalanced, *model, "--epochs", "2", "--image-size", "32", "--balance", balance,
                   "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    remedy = "class-balanced loss weights" if balance == "auto" else "a class-balanced sampler"
    assert f"class balance: training classes 7.0:1 (circle 42, square 6)" in proc.stderr and remedy in proc.stderr
    report = (tmp_path / "run" / "report.html").read_text()
    assert remedy in report and "pixclass audit" in report  # and the pointer to the label audit
    picked = "checkpoints picked by validation macro-F1" if recipe == "scratch" else \
        "no checkpoint picked (the fast recipe ends on its averaged weights)"
    assert picked in proc.stderr
    if recipe == "scratch":  # the step loop picks its checkpoint by validation macro-F1
        with open(tmp_path / "run" / "metrics.csv") as f:
            assert all(row["val_macro_f1"] for row in csv.DictReader(f))


@pytest.mark.slow  # the default set's time goes to the two runs above; `off` is the unit tests' too
def test_balance_off_trains_as_before(imbalanced, tmp_path):
    proc = run_cli("train", imbalanced, "--model", "classic-cnn", "--epochs", "1", "--image-size", "32",
                   "--balance", "off", "--out", tmp_path / "run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "--balance off: no reweighting" in proc.stderr
    assert "val_macro_f1" not in json.loads(proc.stdout)["history"][0]
    with pytest.raises(ConfigError, match="balance must be one of"):
        TrainConfig(balance="always")
