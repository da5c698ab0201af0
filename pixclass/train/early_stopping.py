"""Early stopping on a monitored validation metric."""

from __future__ import annotations


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
