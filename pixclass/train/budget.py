"""A run's time budget (`--budget MINUTES`) and the transfer recipe's plan for spending it.

The budget counts from the start of the run. Before any image is decoded, the transfer recipe
measures this CPU in a short probe (the candidate backbone's forward pass, and one training step of
each candidate tail, on a few random inputs) and plans its phases to fit: the largest backbone
whose features it can compute in a share of the budget, then the most ambitious rung of a ladder
(how many of the backbone's last units to fine-tune on cached features, how many augmented views
of each training image to cache, how many fine-tuning epochs) whose estimated time fits what is
left. Every phase also stops at the deadline with its best epoch, so a wrong estimate costs
epochs, never the budget. The plan's choices go into the run's config.yaml as ordinary fields
(model.name, train.feature_views, train.unfreeze, train.epochs), so `--config` reruns the same
plan; the estimates are recorded beside them in `train.plan`.

A longer budget can only move the plan up the ladder (a larger backbone first, then more units,
views and epochs), and small datasets stop at the ladder's top rung long before a large budget
is spent: beyond it more epochs on a few hundred images only overfit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

DEFAULT_MINUTES = 5.0  # transfer learning when no --budget is given
# the fast recipe's full schedule is its default; a budget caps it (planned from a probe of steps)
FAST_DEFAULT_MINUTES = 15.0

# The offline backbones, best features first (ImageNet top-1 75.5 / 76.6 / 77.5 for 0 / 1 / 2).
BACKBONES = ("efficientnet_lite2", "efficientnet_lite1", "efficientnet_lite0")
FEATURE_SHARE = 0.4  # the clean features of every image may take at most this share of the budget
# (units fine-tuned on cached features, augmented views per training image, fine-tuning epochs),
# most ambitious first; the first rung that fits the budget is the plan. A rung of 8 views above
# the top one was tried and taken out: ~1 point on cxr-pneumonia (within the seeds' spread),
# nothing on ants/bees or caltech12, and it made the default as slow as the guide's recipe there
# (bench/RESULTS.md, "Time budget at 2 and 10 minutes")
LADDER = ((3, 4, 6), (3, 2, 5), (2, 2, 5), (2, 0, 4), (0, 2, 0), (0, 0, 0))
HEAD_EPOCHS = 10  # the head alone on pooled features: milliseconds each
RESERVE_S = 12.0  # building the model, exporting the frozen part, evaluation, the artifact and the report
# ONNX Runtime computes the frozen part's features this many times faster than the eager
# forward pass the probe times (one image per call on each core, with the decoding beside it)
ONNX_SPEEDUP = 2.6


class Budget:
    """`minutes` from `started` (a time.perf_counter() value)."""

    def __init__(self, minutes: float, started: float | None = None):
        self.minutes = float(minutes)
        self.seconds = self.minutes * 60
        self.started = time.perf_counter() if started is None else started

    def left(self) -> float:
        return self.started + self.seconds - time.perf_counter()

    def deadline(self, reserve: float = 0.0) -> float:
        """The time.perf_counter() value by which training must stop to leave `reserve` seconds."""
        return self.started + self.seconds - reserve


@dataclass(frozen=True)
class Speeds:
    """Images per second on this CPU for one backbone at one input size: computing the frozen
    features, and training (and evaluating) the tail that fine-tunes the last `units` units."""
    features: float
    train: dict[int, float] = field(default_factory=dict)
    evaluate: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferPlan:
    backbone: str
    unfreeze: int
    feature_views: int
    epochs: int
    estimate_s: dict

    def describe(self) -> str:
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in self.estimate_s.items())
        tuned = f"the last {self.unfreeze} units fine-tuned {self.epochs} epochs" if self.unfreeze and self.epochs \
            else "the head alone"
        return (f"{self.backbone}, {self.feature_views} augmented views per training image, {tuned} "
                f"(estimated {phases})")


def estimate(n_train: int, n_eval: int, speeds: Speeds, unfreeze: int, views: int, epochs: int) -> dict:
    """Seconds per phase of a transfer run with these choices."""
    tail_epoch = (n_train / speeds.train[unfreeze] + n_eval / speeds.evaluate[unfreeze]) if unfreeze else 0.0
    views_total = n_train * (1 + views) + n_eval
    # the held-out images twice: as they are, and mirrored for test-time augmentation
    return {"features": (views_total + n_eval) / speeds.features,
            # the head trains on pooled features: every cached view once through the frozen tail
            "head": views_total / speeds.evaluate[unfreeze] if unfreeze else 0.0,
            "fine-tuning": epochs * tail_epoch if unfreeze else 0.0,
            "other": RESERVE_S}


def plan_transfer(n_train: int, n_eval: int, seconds: float, speeds_of, backbones=BACKBONES,
                  ladder=LADDER) -> TransferPlan:
    """The plan for `seconds`: the first of `backbones` (best first) whose clean features take at
    most FEATURE_SHARE of the budget (the last one otherwise), with the first rung of `ladder`
    that fits. `speeds_of(backbone)` measures a backbone's Speeds (called only as needed).
    Rungs may pin a choice the user made (the ladder given is then filtered by the caller)."""
    chosen = None
    for name in backbones:
        speeds = speeds_of(name)
        chosen = (name, speeds)
        if (n_train + n_eval) / speeds.features <= FEATURE_SHARE * seconds:
            break
    name, speeds = chosen
    for units, views, epochs in ladder:
        parts = estimate(n_train, n_eval, speeds, units, views, epochs)
        if sum(parts.values()) <= seconds:
            break
    return TransferPlan(name, units, views, epochs, {k: round(v, 1) for k, v in parts.items()})


# Relative costs on a CPU, so that one probe of EfficientNet-Lite0 prices every plan (each
# backbone's forward pass at its own input size, relative to Lite0's at 224; training a tail of the
# last N units on cached features, relative to the whole backbone's forward pass; evaluating it is
# EVAL_SPEEDUP times faster than training it). Measured on 2-core x86 CPUs: bench/RESULTS.md.
FORWARD_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.5, "efficientnet_lite2": 2.2}
TAIL_COST = {2: 0.08, 3: 0.18, 4: 0.8}
EVAL_SPEEDUP = 4.0
PROBE_BACKBONE, PROBE_SIZE = "efficientnet_lite0", 224


def tail_cost(units: int) -> float:
    """Training the last `units` units, relative to the backbone's forward pass: measured for the
    ladder's choices, and for more units (a user's --unfreeze N) more than the deepest measured."""
    if units in TAIL_COST:
        return TAIL_COST[units]
    deepest = max(TAIL_COST)
    return TAIL_COST[deepest] * (units - deepest + 1) if units > deepest else TAIL_COST[min(TAIL_COST)]


def speeds_from_probe(lite0_rate: float, backbone: str, units=range(1, 21)) -> Speeds:
    """Speeds of `backbone` (an EfficientNet-Lite; another backbone is priced as Lite0) from
    Lite0's measured forward rate."""
    forward = lite0_rate / FORWARD_COST.get(backbone, 1.0)
    train = {u: forward / tail_cost(u) for u in units}
    return Speeds(forward * ONNX_SPEEDUP, train, {u: r * EVAL_SPEEDUP for u, r in train.items()})


def probe_forward_rate(model, size: int, channels: int = 3, batch: int = 8, repeats: int = 3) -> float:
    """Images per second of `model`'s backbone forward pass (random weights suffice: the time does
    not depend on them) on a batch of random images, the fastest of `repeats` timings after one
    warm-up (the fastest is the least disturbed by whatever else the machine does): about half a
    second."""
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last).eval()
    fastest = float("inf")
    with torch.inference_mode():
        model.features_until(model.n_units, x)
        for _ in range(repeats):
            started = time.perf_counter()
            model.features_until(model.n_units, x)
            fastest = min(fastest, time.perf_counter() - started)
    return batch / max(fastest, 1e-6)
