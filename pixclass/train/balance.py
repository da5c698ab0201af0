"""The imbalance autopilot: how a run counters unequal class counts in its training split.

`--balance auto` (the default) leaves a balanced split alone; at or above IMBALANCE_THRESHOLD
(largest / smallest class count) it trains with class-balanced loss weights and picks checkpoints
by validation macro-F1 instead of the loss (the loss and the accuracy favour the large classes).
`weights` and `sampler` force one of the two remedies, `off` turns them off. Every recipe gets the
same Balance from run.py: the step loop (loop.Trainer) and the fast recipe apply it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import UserError

BALANCE_MODES = ("auto", "off", "weights", "sampler")
IMBALANCE_THRESHOLD = 3.0
# what the checkpoint choice monitors when the run is balanced
BALANCED_MONITOR = "val_macro_f1"


@dataclass(frozen=True)
class Balance:
    mode: str  # "off", "weights" (class-weighted loss) or "sampler" (class-balanced draws)
    class_weights: tuple[float, ...]  # n / (classes x n_c): 1 for every class of a balanced split
    ratio: float | None  # largest / smallest training class count (None: a class has no image)
    description: str  # one line for the log and the report

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def loss_weights(self) -> torch.Tensor | None:
        """The loss's per-class weights (weights mode), else None."""
        return torch.tensor(self.class_weights, dtype=torch.float32) if self.mode == "weights" else None

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Per-row draw weights of a training split (sampler mode: each class drawn equally often)."""
        if self.mode != "sampler":
            return None
        return torch.tensor(self.class_weights, dtype=torch.double)[labels]

    def monitor(self, configured: str) -> str:
        """The metric that picks the checkpoint: validation macro-F1 when balanced."""
        return BALANCED_MONITOR if self.active else configured


OFF = Balance("off", (), None, "")


def resolve_balance(setting: str, labels, classes: list[str], threshold: float = IMBALANCE_THRESHOLD,
                    no_checkpoint_choice: str = "") -> Balance:
    """The Balance for a training split's labels (class indices) under `setting` (BALANCE_MODES).
    `no_checkpoint_choice`: why the run picks no checkpoint (no validation split, a recipe that
    keeps its final weights), said in place of "checkpoints picked by validation macro-F1"."""
    if setting not in BALANCE_MODES:
        raise UserError(f"balance must be one of {', '.join(BALANCE_MODES)} (got {setting!r})")
    counts = Counter(int(y) for y in labels)
    n_per_class = [counts.get(i, 0) for i in range(len(classes))]
    present = [n for n in n_per_class if n]
    if not present:
        return OFF
    ratio = max(present) / min(present) if len(present) == len(n_per_class) else None
    total = sum(n_per_class)
    weights = tuple(total / (len(present) * n) if n else 0.0 for n in n_per_class)
    big, small = max(range(len(classes)), key=n_per_class.__getitem__), min(range(len(classes)), key=n_per_class.__getitem__)
    seen = (f"training classes {ratio:.1f}:1 ({classes[big]} {n_per_class[big]}, {classes[small]} {n_per_class[small]})"
            if ratio is not None else "a class has no training image")
    if setting == "off":
        note = f"{seen}; --balance off: no reweighting" if ratio is not None and ratio >= threshold else ""
        return Balance("off", weights, ratio, note)
    if setting == "auto":
        if ratio is None or ratio < threshold:
            return Balance("off", weights, ratio, "")
        mode, why = "weights", f"at or above {threshold:g}:1, so "
    else:
        mode, why = setting, "--balance " + setting + ": "
    remedy = "class-balanced loss weights" if mode == "weights" else "a class-balanced sampler"
    picked = (f"no checkpoint picked ({no_checkpoint_choice})" if no_checkpoint_choice
              else "checkpoints picked by validation macro-F1")
    return Balance(mode, weights, ratio, f"{seen}: {why}{remedy}, {picked} (--balance off turns this off)")
