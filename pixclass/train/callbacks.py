"""What happens at the end of each epoch besides the loop itself: the history files and early
stopping."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from .. import plots

HISTORY_FIELDS = ["epoch", "phase", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                  "epoch_s", "images_per_s", "elapsed_s"]


class HistoryLog:
    """Writes metrics.csv after every epoch, and curves.png at the end of a phase or when the
    last plot is older than PLOT_INTERVAL_S (a plot costs more than an epoch on cached features)."""

    PLOT_INTERVAL_S = 30.0

    def __init__(self, run_dir: Path | None):
        self.run_dir = Path(run_dir) if run_dir else None
        self._last_plot = time.monotonic()

    def write(self, history: list[dict], plot: bool = True) -> None:
        if self.run_dir is None or not history:
            return
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        if plot or time.monotonic() - self._last_plot >= self.PLOT_INTERVAL_S:
            plots.training_curves(history, self.run_dir / "curves.png")
            self._last_plot = time.monotonic()


class EarlyStopping:
    """Tracks the monitored metric; `improved` says whether this epoch is the best so far and
    `should_stop` whether `patience` epochs have passed without improvement (0: never stops)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 1e-4):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.monitor.endswith("loss"):
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict) -> bool:
        value = metrics.get(self.monitor)
        if value is None:  # no validation set: the latest epoch counts as the best
            return True
        if self._better(value):
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
