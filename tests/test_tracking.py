"""Experiment tracking (issue 21, part 1): `pixclass train --track mlflow --track tensorboard` on
drawn shapes, read back through MLflow's own API and TensorBoard's EventAccumulator."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from pixclass.config import RunConfig, TrainConfig
from pixclass.errors import ConfigError

from conftest import make_shapes, run_cli

TRAIN = ["-m", "classic-cnn", "--image-size", "32", "--augment", "none", "--batch-size", "16", "-q"]


def _metrics_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _scalars(folder: Path) -> "EventAccumulator":
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return events


@pytest.fixture
def mlflow_at(tmp_path):
    """mlflow, pointed at the store `pixclass train` made in tmp_path by default; the global
    tracking URI put back afterwards."""
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_train_tracks_to_mlflow_and_tensorboard(tmp_path, mlflow_at):
    data = make_shapes(tmp_path / "shapes", per_class=10)
    proc = run_cli("train", data, *TRAIN, "--epochs", "2", "--track", "mlflow", "--track", "tensorboard",
                   "-o", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    run_dir = tmp_path / "run"
    rows = _metrics_csv(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # a --config rerun tracks the same way
    assert RunConfig.load_yaml(run_dir / "config.yaml").train.track == ("mlflow", "tensorboard")

    # MLflow: the default store is ./mlflow.db where pixclass ran
    mlflow = mlflow_at
    runs = mlflow.search_runs()
    assert len(runs) == 1 and runs.status[0] == "FINISHED" and runs["tags.mlflow.runName"][0] == "run"
    run_id = runs.run_id[0]
    assert runs["params.train.epochs"][0] == "2" and runs["params.model.name"][0] == "classic-cnn"
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(int(r["epoch"]), round(float(r["val_loss"]), 6))
                                                              for r in rows]
    assert runs["metrics.test/accuracy"][0] >= 0
    logged = {a.path for a in client.list_artifacts(run_id, "run")}
    assert {"run/model", "run/report.html", "run/metrics.csv", "run/config.yaml"} <= logged
    assert "run/checkpoints" not in logged
    models = mlflow.search_logged_models(output_format="list")
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]

    from pixclass.predict import Predictor
    images = sorted(str(p) for p in data.glob("*/*_00[0-3].png"))
    predictor = Predictor.load(run_dir / "model")
    expected = [predictor.classes[i] for i in predictor.probabilities(images).argmax(1)]
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    assert model.predict(images) == expected
    import pandas as pd
    assert model.predict(pd.DataFrame({"path": images})) == expected

    # TensorBoard: the same per-epoch numbers, the run's figures, the final metrics
    events = _scalars(run_dir / "tensorboard")
    tags = events.Tags()
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "test/accuracy"} <= set(tags["scalars"])
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train_accuracy")] == \
        [(int(r["epoch"]), round(float(r["train_accuracy"]), 5)) for r in rows]
    assert {"confusion_matrix", "curves"} <= set(tags["images"])
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.epochs"].number_value == 2 and hparams["model.name"].string_value == "classic-cnn"


def test_tracking_server_out_of_reach_does_not_cost_the_run(tmp_path, monkeypatch, capfd):
    """The fast recipe (a loop of its own) with MLflow unreachable: one warning, a finished run,
    and TensorBoard still gets every epoch."""
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    data = make_shapes(tmp_path / "shapes", per_class=10, size=32)
    cfg = RunConfig(data=DataConfig(path=str(data)), model=ModelConfig(name="airbench"),
                    augment=AugmentConfig(policy="none"),
                    train=TrainConfig(recipe="fast", epochs=2, track=("mlflow", "tensorboard")))
    summary = run_training(cfg, out=tmp_path / "run", reporter=Reporter(quiet=True))
    assert Path(summary["model_dir"], "pixclass.json").is_file()
    warnings = [line for line in capfd.readouterr().err.splitlines() if "mlflow tracking" in line]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0]
    events = _scalars(tmp_path / "run" / "tensorboard")
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


class _Recorder:
    name = "recorder"

    def __init__(self, fail: bool = False):
        self.fail, self.rows, self.closed = fail, [], None

    def log_epoch(self, row):
        if self.fail:
            raise ConnectionError("tracking server went away")
        self.rows.append(row)

    def finish(self, cfg, summary, run_dir):
        self.rows.append("finished")

    def close(self, failed):
        self.closed = failed


def test_a_failing_tracker_is_warned_about_once_and_dropped(tmp_path):
    from pixclass.train.tracking import Tracking
    warned = []
    tracking = Tracking(RunConfig(train=TrainConfig(track=("mlflow",))), tmp_path,
                        type("Warn", (), {"warn": staticmethod(warned.append)})())
    failing, working = _Recorder(fail=True), _Recorder()
    tracking._trackers = [failing, working]  # as started
    for epoch in (1, 2, 3):
        tracking.after_epoch(None, {"epoch": epoch, "train_loss": 1.0 / epoch}, epoch == 3)
    tracking.finish(RunConfig(), {}, tmp_path)
    tracking.close(failed=False)
    assert len(warned) == 1 and "tracking server went away" in warned[0]
    assert failing.closed is True and working.closed is False
    assert [r if isinstance(r, str) else r["epoch"] for r in working.rows] == [1, 2, 3, "finished"]


def test_missing_tracking_library_is_one_error_line(tmp_path, monkeypatch, capsys):
    from pixclass.cli import main
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if pixclass[track] were not installed
    data = make_shapes(tmp_path / "shapes", per_class=4)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(data), *TRAIN, "--track", "tensorboard", "-o", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0] == "error: --track tensorboard needs tensorboard: pip install 'pixclass[track]'"
    assert not (tmp_path / "run").exists()  # said before the run began


def test_train_without_track_imports_neither_library(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=6)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pixclass", "train", str(data), *TRAIN,
                           "--epochs", "1", "-o", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "pixclass.train.run" in imported and "pixclass.train.tracking" in imported
    assert not [m for m in imported if m.split(".")[0] in ("mlflow", "tensorboard") or "tensorboard" in m]


def test_track_in_config():
    assert TrainConfig(track="mlflow").track == ("mlflow",)  # YAML's `track: mlflow`
    assert TrainConfig(track=["tensorboard", "mlflow", "tensorboard"]).track == ("tensorboard", "mlflow")
    with pytest.raises(ConfigError, match="track must be one of tensorboard, mlflow"):
        TrainConfig(track=("wandb",))
