"""What a training run does around the step loop, as hooks the Trainer calls: checkpoints and the
history file here, experiment tracking in tracking.py. A phase that should leave no checkpoint (or
a rank that writes nothing) simply gets no hook; the Trainer itself knows nothing about files.

A hook may implement any of: `after_step(trainer)` (the loop state is consistent and resumable
mid-epoch), `after_epoch(trainer, row, last)` (`last`: the phase ends after this epoch; `trainer`
is None from a recipe with a loop of its own, the fast one)."""

from __future__ import annotations

import copy
import csv
import io
import time
from pathlib import Path

import torch
from torch import nn

from ..atomic_write import write_text_atomically
from .balance import BALANCED_MONITOR
from .checkpoint import save_checkpoint
from .loop import MULTILABEL_MONITOR

HISTORY_FIELDS = ["epoch", "phase", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                  "epoch_s", "images_per_s", "elapsed_s"]


def write_history(history: list[dict], path: Path) -> None:
    """metrics.csv, replaced whole: a full disk leaves the previous epoch's file, not a torn one."""
    text = io.StringIO(newline="")
    # a balanced run's checkpoints are picked by validation macro-F1 (balance.py), a multi-label
    # run's by validation mAP (loop.py): their columns too
    extra = [name for name in (BALANCED_MONITOR, MULTILABEL_MONITOR) if any(name in row for row in history)]
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomically(path, text.getvalue())


class HistoryFile:
    """metrics.csv after every epoch. On long runs also curves.png, to watch while training, when
    the last drawing is older than LIVE_CURVES_S (a drawing costs more than an epoch on cached
    features, so short runs get theirs once, from the run at the end)."""

    LIVE_CURVES_S = 30.0

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._last_drawn = time.monotonic()

    def after_epoch(self, trainer, row: dict, last: bool) -> None:
        write_history(trainer.history, self.run_dir / "metrics.csv")
        if not last and time.monotonic() - self._last_drawn >= self.LIVE_CURVES_S:
            from ..plots import training_curves
            training_curves(trainer.history, self.run_dir / "curves.png")
            self._last_drawn = time.monotonic()


class Checkpoints:
    """checkpoints/last.pt and best.pt of `saved_model` (by default the trained module; a transfer
    phase trains a part of the network and saves the whole). Written at the end of the phase, and
    otherwise at most every `checkpoint_interval` seconds, also mid-epoch: epochs on cached
    features take milliseconds, and writing a whole backbone after each would cost more than the
    training. best.pt goes first: a kill between the two writes then leaves a best.pt that the
    replay from the older last.pt reaches again, identically. `at_phase_end=False` for an earlier
    phase of a run whose last phase writes the final checkpoints."""

    def __init__(self, run_dir: Path, saved_model: nn.Module | None = None, extra: dict | None = None,
                 at_phase_end: bool = True):
        self.folder = Path(run_dir) / "checkpoints"
        self.saved_model, self.extra, self.at_phase_end = saved_model, extra or {}, at_phase_end
        self._best, self._last_save = None, time.monotonic()

    def after_step(self, trainer) -> None:
        self._save(trainer, final=False)

    def after_epoch(self, trainer, row: dict, last: bool) -> None:
        if trainer.improved:  # the trainer's own copy where it trains the saved model itself
            self._best = trainer.best_state if self.saved_model is None else copy.deepcopy(
                self.saved_model.state_dict())
        self._save(trainer, final=last and self.at_phase_end)

    def _model(self, trainer) -> nn.Module:
        return self.saved_model or trainer.model

    def _save(self, trainer, final: bool) -> None:
        due = time.monotonic() - self._last_save >= trainer.cfg.checkpoint_interval
        if not (final or due):
            return
        model = self._model(trainer)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            from .loop import NonFiniteLossError
            raise NonFiniteLossError(f"weights became non-finite at step {trainer.step} (epoch {trainer.epoch + 1}); "
                                     f"the last good checkpoint is kept; try a lower learning rate")
        state = {**trainer.state_dict(), "model": model.state_dict(), "extra": self.extra}
        if self._best is not None:
            save_checkpoint({**state, "model": self._best}, self.folder / "best.pt")
            self._best = None
        save_checkpoint(state, self.folder / "last.pt")
        self._last_save = time.monotonic()
