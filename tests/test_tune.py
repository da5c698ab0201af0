"""`pixclass tune` (Optuna over the recipe's settings, selected on validation) and the
learning-rate finder (`pixclass lr-find`, `train --lr auto`), end to end on small drawn shapes."""

import json

import numpy as np
import pytest
import yaml

from pixclass.cli import main

from conftest import make_shapes, run_cli

# the classic CNN trains on these in a second or two per trial
CNN = ("--model", "classic-cnn", "--split", "0.7,0.3,0")


@pytest.fixture(scope="module")
def shapes_small(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("tune") / "shapes", per_class=20, size=32)


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _one_error(capsys, args, words: str) -> None:
    """`pixclass ARGS` (in this process) exits with 2 and one `error:` line holding `words`."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_tune_writes_a_study_and_a_best_config_that_train_reproduces(shapes_small, tmp_path):
    import optuna
    found = _json(run_cli("tune", shapes_small, *CNN, "--trials", "3", "--seed", "1", "--out", tmp_path / "t",
                          "--json"))
    study = optuna.load_study(study_name="pixclass", storage=f"sqlite:///{tmp_path / 't' / 'tune.db'}")
    assert len(study.trials) == 3 and study.best_value == found["best_value"]
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3  # the sampler tried 3 settings
    best = yaml.safe_load((tmp_path / "t" / "best.yaml").read_text())
    assert best["train"]["seed"] == 1 and best["train"]["lr"] == study.best_params["lr"]
    assert best["train"]["epochs"] == study.best_params["epochs"]
    assert best["model"]["dropout"] == study.best_params["dropout"]
    rerun = _json(run_cli("train", "--config", tmp_path / "t" / "best.yaml", "--out", tmp_path / "r", "--json"))
    n_val = rerun["metrics"]["n"]  # the held-out split is val here (no test split)
    assert rerun["metrics"]["split"] == "val"
    assert abs(rerun["metrics"]["val_accuracy"] - found["best_value"]) * n_val <= 1 + 1e-9


@pytest.mark.parametrize("args, words", [
    (("--trials", "0"), "--trials must be at least 1"),
    (("--trials", "2", "--budget", "0"), "--budget must be"),
    (("--trials", "2", "--model", "airbench"), "fixed schedule"),
])
def test_tune_bad_options_are_one_line(shapes_small, tmp_path, capsys, args, words):
    _one_error(capsys, ["tune", shapes_small, *args, "--out", tmp_path / "t"], words)
    assert not (tmp_path / "t").exists()


def test_tune_refuses_data_without_a_validation_split(shapes_small, tmp_path, capsys):
    _one_error(capsys, ["tune", shapes_small, "--model", "classic-cnn", "--split", "1,0,0", "--out", tmp_path / "t"],
               "validation split")


def test_lr_find_suggests_a_rate_and_draws_the_curve(shapes_small, tmp_path):
    found = _json(run_cli("lr-find", shapes_small, "--model", "classic-cnn", "--steps", "60", "--threads", "1", "--out", tmp_path,
                          "--json"))
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert 1e-7 < found["suggestion"] < 10 and found["suggestion"] == min(found["steepest"], found["minimum"])
    assert 10 <= found["steps"] <= 60


def test_lr_find_bad_method_is_one_line(shapes_small, tmp_path, capsys):
    _one_error(capsys, ["lr-find", shapes_small, "--method", "valley", "--out", tmp_path], "--method must be one of")


def test_train_lr_auto_records_the_rate_found(shapes_small, tmp_path):
    summary = _json(run_cli("train", shapes_small, *CNN, "--epochs", "1", "--lr", "auto", "--threads", "1",
                            "--out", tmp_path / "r", "--json"))
    lr = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["lr"]
    assert isinstance(lr, float) and 1e-7 < lr < 10
    assert (tmp_path / "r" / "lr_find.png").is_file() and summary["epochs_run"] == 1


def test_train_lr_not_a_number_is_one_line(shapes_small, tmp_path, capsys):
    _one_error(capsys, ["train", shapes_small, "--lr", "fast", "--out", tmp_path / "r"], "--lr must be a number or auto")


def test_suggestions_find_the_steepest_descent_and_the_minimum():
    from pixclass.train.lr_find import suggestions
    lrs = np.logspace(-6, 0, 121)
    # falls fastest at 1e-3, lowest at 1e-1, then diverges
    losses = 2 - np.tanh(np.log10(lrs) + 3) + np.maximum(0, np.log10(lrs) + 1) ** 2 * 5
    steepest, minimum = suggestions(list(lrs), list(losses))
    assert steepest == pytest.approx(1e-3, rel=0.15)
    assert minimum == pytest.approx(1e-2, rel=0.15)


@pytest.mark.slow
def test_tune_transfer_reuses_the_feature_cache_and_best_yaml_reproduces(shapes_small, tmp_path):
    """The transfer recipe's search (head epochs, fine-tuning depth, cached views) on EfficientNet-Lite0."""
    found = _json(run_cli("tune", shapes_small, "--recipe", "transfer", "--split", "0.7,0.3,0", "--trials", "4",
                          "--out", tmp_path / "t", "--json"))
    assert {"head_epochs", "unfreeze", "feature_views"} <= set(found["trials"][0]["params"])
    rerun = _json(run_cli("train", "--config", tmp_path / "t" / "best.yaml", "--out", tmp_path / "r", "--json"))
    assert abs(rerun["metrics"]["val_accuracy"] - found["best_value"]) * rerun["metrics"]["n"] <= 1 + 1e-9
