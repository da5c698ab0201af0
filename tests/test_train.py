import csv

import pytest
import torch

from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from pixclass.progress import Reporter
from pixclass.train.optim import LRSchedule
from pixclass.train.run import run_training


def _cfg(path, **train):
    return RunConfig(data=DataConfig(path=str(path), image_size=32), model=ModelConfig(name="classic-cnn"),
                     augment=AugmentConfig(policy="standard"),
                     train=TrainConfig(**{"epochs": 3, "batch_size": 16, **train}))


def test_run_folder_contents_and_learning(trained_run):
    from pathlib import Path
    run = Path(trained_run["run_dir"])
    for name in ("config.yaml", "manifest.csv", "metrics.csv", "curves.png", "checkpoints/best.pt",
                 "checkpoints/last.pt", "model/model.safetensors", "model/pixclass.json",
                 "evaluation/metrics.json", "evaluation/per_class.csv", "report.html", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 12 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert trained_run["metrics"]["accuracy"] >= 0.8  # three drawn shapes are easy


def test_same_seed_same_weights(shapes, tmp_path):
    a = run_training(_cfg(shapes, epochs=1), out=tmp_path / "a", reporter=Reporter(True))
    b = run_training(_cfg(shapes, epochs=1), out=tmp_path / "b", reporter=Reporter(True))
    from safetensors.torch import load_file
    wa, wb = load_file(f"{a['model_dir']}/model.safetensors"), load_file(f"{b['model_dir']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_to_the_same_weights(shapes, tmp_path):
    from safetensors.torch import load_file
    full = run_training(_cfg(shapes, epochs=3), out=tmp_path / "full", reporter=Reporter(True))
    run_training(_cfg(shapes, epochs=2), out=tmp_path / "part", reporter=Reporter(True))
    resumed = run_training(_cfg(shapes, epochs=3), resume=tmp_path / "part", reporter=Reporter(True))
    assert resumed["epochs_run"] == 3
    wa, wb = load_file(f"{full['model_dir']}/model.safetensors"), load_file(f"{resumed['model_dir']}/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k]) for k in wa)


def test_early_stopping_stops(shapes, tmp_path):
    # a learning rate of zero never improves validation loss after the first epoch
    out = run_training(_cfg(shapes, epochs=10, lr=1e-12, early_stopping=2), out=tmp_path / "r", reporter=Reporter(True))
    assert out["epochs_run"] == 3


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle", "plateau"])
def test_schedules_shape(schedule):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = TrainConfig(epochs=10, schedule=schedule, warmup_epochs=1, step_size=3, gamma=0.5, plateau_patience=1)
    s = LRSchedule(opt, cfg, steps_per_epoch=10)
    lrs = [s.apply(step) for step in range(100)]
    assert lrs[0] < lrs[9]  # warmup rises over the first epoch
    if schedule == "constant":
        assert lrs[0] == pytest.approx(0.1) and lrs[10:] == [1.0] * 90
    if schedule == "cosine":
        assert lrs[99] < 0.01
    if schedule == "step":
        assert lrs[35] == pytest.approx(0.5)
    if schedule == "onecycle":
        assert max(lrs) == pytest.approx(1.0, abs=0.05) and lrs[99] < 0.01
    if schedule == "plateau":
        s.epoch_end(1.0)
        s.epoch_end(1.0)
        assert s.apply(50) == pytest.approx(0.5)


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    from conftest import run_cli
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {shapes}\n  image_size: 32\nmodel:\n  name: seed-cnn\ntrain:\n  epochs: 3\n  batch_size: 8\n"
                      "  lr: 1.0e+12\n  checkpoint_interval: 0\n")
    proc = run_cli("train", "--config", config, "--out", tmp_path / "r", "-q")
    assert proc.returncode == 2, proc.stderr
    assert "loss became nan at step 1 " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count(".png") == 8  # the batch's files are named
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
