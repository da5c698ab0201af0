"""The learning-rate range test (Leslie Smith's, as fastai's `lr_find`): train for a few hundred
steps while the rate grows exponentially from tiny to huge, record the loss (smoothed), stop once
it diverges, and suggest a rate from the curve. The module's weights are put back afterwards, so
the run that follows starts from the same weights it would have had without the test."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from .loop import set_threads
from .optim import build_optimizer

START_LR, END_LR, STEPS = 1e-7, 10.0, 200
SMOOTHING = 0.98  # the loss's exponential moving average (bias-corrected), as fastai's
DIVERGED = 4.0  # the sweep stops once the smoothed loss exceeds this many times its minimum
# "lower": the lower of the two suggestions. The steepest point can sit close to where the loss
# turns up (then minimum/10 is lower), and a loss that never turns up within the sweep (a small
# head under Adam) puts the minimum at the sweep's end (then the steepest point is lower);
# bench/RESULTS.md, "lr-find"
METHODS = ("lower", "steepest", "minimum")


@dataclass(frozen=True)
class LRFinding:
    lrs: list[float]
    losses: list[float]  # smoothed
    steepest: float  # the rate where the smoothed loss falls fastest (per decade of rate)
    minimum: float  # the rate of the smoothed loss' minimum, divided by 10
    method: str

    @property
    def suggestion(self) -> float:
        return {"lower": min(self.steepest, self.minimum), "steepest": self.steepest,
                "minimum": self.minimum}[self.method]

    def describe(self) -> str:
        return (f"suggested lr {self.suggestion:.2e} ({self.method}; steepest descent {self.steepest:.2e}, "
                f"minimum/10 {self.minimum:.2e}; {len(self.lrs)} steps)")


def range_test(target, cfg: TrainConfig, device=None, steps: int = STEPS, start: float = START_LR,
               end: float = END_LR, method: str = "lower") -> LRFinding:
    """Sweep `target` (a recipes.SweepTarget) with `cfg`'s optimizer, batch size, weight decay and
    label smoothing from `start` to `end` over `steps` steps (cycling through the training split)."""
    if method not in METHODS:
        raise UserError(f"the lr-find method must be one of {', '.join(METHODS)} (got {method!r})")
    if steps < 10:
        raise UserError(f"lr-find needs at least 10 steps (got {steps})")
    set_threads(cfg.threads)
    module: nn.Module = target.module
    device = torch.device(device or "cpu")
    module.to(device)
    saved = copy.deepcopy(module.state_dict())
    groups = target.param_groups or [{"params": [p for p in module.parameters() if p.requires_grad]}]
    scales = [g.get("lr_scale", 1.0) for g in groups]
    optimizer = build_optimizer([{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": start} for g in groups],
                                dataclasses.replace(cfg, lr=start))
    # a multi-label split (multi-hot labels N x K) sweeps the loss it trains with
    loss_fn = nn.BCEWithLogitsLoss() if target.train.labels.ndim == 2 else \
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing or 0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    lrs, losses, average, best = [], [], 0.0, math.inf
    module.train()
    try:
        for step, (x, labels) in enumerate(_batches(target, cfg.batch_size, generator, steps)):
            lr = start * (end / start) ** (step / (steps - 1))
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            loss = loss_fn(module(x.to(device)).float(), labels.to(device))
            if not torch.isfinite(loss):
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if step > steps // 10 and smoothed > DIVERGED * best:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        module.load_state_dict(saved)
    if len(lrs) < 10:
        raise UserError(f"the learning-rate sweep stopped after {len(lrs)} steps (the loss was not finite); "
                        f"check the data, or set --lr yourself")
    steepest, minimum = suggestions(lrs, losses)
    return LRFinding(lrs, losses, steepest, minimum, method)


def suggestions(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest descent, minimum / 10) of a smoothed loss curve. The steepest point is looked for
    before the minimum, and after the first tenth of the sweep, where the average is still settling."""
    lrs_a, losses_a = np.asarray(lrs), np.asarray(losses)
    low = int(np.argmin(losses_a))
    skip = min(len(lrs) // 10, max(low - 1, 0))
    slopes = np.gradient(losses_a, np.log10(lrs_a))
    window = slice(skip, max(low, skip + 1))
    steepest = lrs_a[window][int(np.argmin(slopes[window]))]
    return float(steepest), float(lrs_a[low] / 10)


def _batches(target, batch_size: int, generator: torch.Generator, steps: int):
    """`steps` (inputs, labels) training batches, epoch after epoch; batches of one are left out
    (BatchNorm cannot train on them)."""
    if len(target.train) < 2:
        raise UserError("lr-find needs at least 2 training images")
    done = 0
    while True:
        for images, labels, _ in target.train.batches(batch_size, shuffle=True, generator=generator):
            if len(labels) < 2:
                continue
            yield target.inputs(images, generator), labels
            done += 1
            if done == steps:
                return
