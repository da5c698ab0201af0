"""Optimizers and learning-rate schedules.

The schedule is one small class rather than a chain of torch schedulers because warmup has to
combine with every shape, reduce-on-plateau included, and its whole state must go into a
checkpoint: lr(step) = base_lr * warmup(step) * shape(step) * plateau_scale."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


class LRSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int | None = None):
        self.optimizer, self.cfg = optimizer, cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = self.steps_per_epoch * (epochs or cfg.epochs)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.plateau_scale, self.plateau_best, self.plateau_bad = 1.0, None, 0

    def factor(self, step: int) -> float:
        cfg = self.cfg
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        t = min(1.0, step / self.total_steps)
        if cfg.schedule == "step":
            shape = cfg.gamma ** (step // self.steps_per_epoch // cfg.step_size)
        elif cfg.schedule == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * t))
        elif cfg.schedule == "onecycle":  # linear rise over the first 30%, cosine decay after
            shape = 0.04 + 0.96 * t / 0.3 if t < 0.3 else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
        else:
            shape = 1.0
        return warm * shape * self.plateau_scale

    def apply(self, step: int) -> float:
        """Set the learning rate for `step` (global, 0-based); returns the first group's rate."""
        f = self.factor(step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def epoch_end(self, val_loss: float | None) -> None:
        """Reduce-on-plateau: cut the rate by gamma after `plateau_patience` epochs without a new best."""
        if self.cfg.schedule != "plateau" or val_loss is None:
            return
        if self.plateau_best is None or val_loss < self.plateau_best - 1e-4:
            self.plateau_best, self.plateau_bad = val_loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.gamma
                self.plateau_bad = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.plateau_best, self.plateau_bad = state["plateau_scale"], state["plateau_best"], state["plateau_bad"]
