"""Experiment tracking (`--track tensorboard|mlflow`, config `train.track`): the run's config, its
per-epoch rows (metrics.csv's columns), the final metrics, figures and model, sent to TensorBoard
and/or MLflow. run.py opens one `Tracking` per run, on rank 0 only, and gives it to every recipe
as a hook, so all recipes report the same way. Each library is imported only when its tracker is
asked for. A tracker that fails (a tracking server out of reach, a full disk) is warned about once
and dropped: tracking never costs the run."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import RunConfig
from ..errors import first_line
from ..extras import require_installed

EXTRA = "track"  # pip install 'pixclass[track]'
LIBRARIES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # the package each tracker needs
# the run's figures (report.py, plots.py) shown beside the numbers, by their file in the run folder
FIGURES = ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png")


def check_installed(cfg: RunConfig) -> None:
    """One line naming the pip extra when a tracker asked for is not installed: said before the
    run begins (on every rank, so none waits for a rank 0 that stopped), not after its training."""
    for name in cfg.train.track:
        require_installed(LIBRARIES[name], EXTRA, f"--track {name}")


def epoch_scalars(row: dict) -> dict[str, float]:
    """An epoch's numbers by their metrics.csv name (lr, train_loss, val_accuracy, epoch_s...)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def final_metrics(summary: dict) -> dict[str, float]:
    """The held-out split's numbers as "SPLIT/NAME" (test/accuracy, test/macro_f1...): apart from
    the per-epoch val_* ones even when the held-out split is val."""
    metrics = summary.get("metrics") or {}
    split = metrics.get("split", "held_out")
    return {f"{split}/{k}": v for k, v in epoch_scalars(metrics).items()}


def flat_config(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as "section.key": value, lists and None written as text (what both
    MLflow params and TensorBoard hparams take)."""
    return {f"{section}.{key}": value if isinstance(value, (str, int, float, bool)) else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def figures(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in FIGURES if (run_dir / name).is_file()]


class Tracking:
    """The trackers of one run: a hook (`after_epoch`) for the recipes' loops; run.py calls
    `finish` once the artifact and report are written, and `close` in every case. The trackers
    start with the first epoch's row: a run that stops before it trains leaves no tracking run
    and no files in its folder (which is then given back, see run.py). `Tracking()` tracks nothing.
    `resumed`: the run folder was trained in before (an MLflow run is continued)."""

    def __init__(self, cfg: RunConfig | None = None, run_dir: Path | None = None, reporter=None,
                 resumed: bool = False):
        self.cfg, self.run_dir, self.reporter, self.resumed = cfg, run_dir, reporter, resumed
        self._trackers = None if cfg is not None and cfg.train.track else []

    def after_epoch(self, trainer, row: dict, last: bool) -> None:
        self._each("log_epoch", row)

    def finish(self, cfg: RunConfig, summary: dict, run_dir: Path) -> None:
        self._each("finish", cfg, summary, Path(run_dir))

    def close(self, failed: bool) -> None:
        for tracker in self._trackers or []:
            try:
                tracker.close(failed)
            except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than its tracking
                self.reporter.warn(f"{tracker.name} tracking could not be closed: {first_line(e)}")
        self._trackers = []

    def _started(self) -> list:
        if self._trackers is None:
            self._trackers = []
            for name in self.cfg.train.track:
                try:
                    self._trackers.append(_start(name, self.cfg, Path(self.run_dir), self.resumed))
                except Exception as e:  # noqa: BLE001 - e.g. a tracking server out of reach
                    self.reporter.warn(f"{name} tracking could not start ({first_line(e)}); "
                                       f"the run goes on without it")
        return self._trackers

    def _each(self, method: str, *args) -> None:
        for tracker in list(self._started()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - any failure of a tracking library: warned about, dropped
                self._drop(tracker, e)

    def _drop(self, tracker, error: Exception) -> None:
        self.reporter.warn(f"{tracker.name} tracking failed ({first_line(error)}); the run goes on without it")
        self._trackers.remove(tracker)
        try:
            tracker.close(failed=True)
        except Exception:  # noqa: BLE001 - already said it failed
            pass


def _start(name: str, cfg: RunConfig, run_dir: Path, resumed: bool):
    if name == "tensorboard":
        from .tensorboard_tracker import TensorBoardTracker
        return TensorBoardTracker(cfg, run_dir)
    from .mlflow_tracker import MlflowTracker
    return MlflowTracker(cfg, run_dir, resumed)
