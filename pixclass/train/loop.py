"""The training loop: epochs of batched, augmented steps, validation, history, checkpoints,
early stopping and resume."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..data.transforms import BatchAugment, Preprocess, batch_to_input
from ..errors import UserError
from ..inference import predict_batches
from ..metrics import cross_entropy
from ..progress import Reporter
from .callbacks import EarlyStopping, HistoryLog
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import LRSchedule, build_optimizer


class NonFiniteLossError(UserError):
    pass


def set_threads(threads: int | None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


class Trainer:
    """Trains `model` on `train` (a SplitData or StreamingSplit), validating on `val` if given."""

    def __init__(self, model: nn.Module, train, val, pre: Preprocess, cfg: TrainConfig,
                 augment: BatchAugment | None = None, run_dir: Path | None = None,
                 reporter: Reporter | None = None, phase: str = "train", extra: dict | None = None):
        self.model = model.to(memory_format=torch.channels_last)
        self.train, self.val, self.pre, self.cfg, self.augment = train, val, pre, cfg, augment
        self.run_dir = Path(run_dir) if run_dir else None
        self.reporter = reporter or Reporter()
        self.phase = phase
        self.extra = extra or {}  # saved with every checkpoint: what a resume needs besides the loop state
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.schedule = LRSchedule(self.optimizer, cfg, self.steps_per_epoch)
        self.stopper = EarlyStopping(cfg.monitor if val is not None and len(val) else "none", cfg.early_stopping)
        self.history: list[dict] = []
        self.epoch, self.step = 0, 0
        self.best_state = None
        self.log = HistoryLog(self.run_dir)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "stopper": self.stopper.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history, "phase": self.phase,
                "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg), "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.stopper.load_state_dict(state["stopper"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["torch_rng"])

    def resume(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))
        best = Path(path).with_name("best.pt")
        if best.is_file():
            self.best_state = load_checkpoint(best)["model"]
        self.reporter.info(f"resumed from {path} at epoch {self.epoch}")

    def _save(self, improved: bool) -> None:
        if self.run_dir is None:
            return
        state = self.state_dict()
        save_checkpoint(state, self.run_dir / "checkpoints" / "last.pt")
        if improved:
            save_checkpoint(state, self.run_dir / "checkpoints" / "best.pt")

    # -- the loop ----------------------------------------------------------------------------
    def _train_epoch(self, generator: torch.Generator) -> dict:
        self.model.train()
        total_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        with self.reporter.bar(f"epoch {self.epoch + 1}/{self.cfg.epochs}", len(self.train), stats=True) as bar:
            for images, labels, idx in self.train.batches(self.cfg.batch_size, shuffle=True, generator=generator):
                if len(labels) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                self.schedule.apply(self.step)
                x = batch_to_input(images, self.pre, self.augment, generator)
                logits = self.model(x)
                loss = self.loss_fn(logits, labels)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss became {loss.item()} at step {self.step} "
                                             f"(epoch {self.epoch + 1}); try a lower learning rate")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                n = len(labels)
                total_loss += loss.item() * n
                correct += (logits.argmax(1) == labels).sum().item()
                seen += n
                rate = seen / (time.perf_counter() - t0)
                bar.advance(n, f"loss {total_loss / seen:.4f} acc {correct / seen:.4f} {rate:.0f} img/s")
        elapsed = time.perf_counter() - t0
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "epoch_s": round(elapsed, 3), "images_per_s": round(seen / max(elapsed, 1e-9), 1)}

    def _validate(self) -> dict:
        if self.val is None or len(self.val) == 0:
            return {"val_loss": None, "val_accuracy": None}
        probs, labels, _ = predict_batches(self.model, self.val.batches(256), self.pre)
        return {"val_loss": cross_entropy(labels, probs), "val_accuracy": float((probs.argmax(1) == labels).mean())}

    def fit(self) -> list[dict]:
        set_threads(self.cfg.threads)
        while self.epoch < self.cfg.epochs:
            # one generator per epoch, seeded by (seed, epoch): shuffling and augmentation of an
            # epoch are the same whether the run was interrupted and resumed or not
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            row = {"epoch": self.epoch + 1, "phase": self.phase, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self._train_epoch(generator))
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row.update(self._validate())
            self.schedule.epoch_end(row["val_loss"])
            improved = self.stopper.update(row)
            if improved:
                self.best_state = copy.deepcopy(self.model.state_dict())
            self.history.append(row)
            self.epoch += 1
            self._save(improved)
            self.log.write(self.history)
            self.reporter.info(_epoch_line(row))
            if self.stopper.should_stop:
                self.reporter.info(f"early stopping: {self.cfg.monitor} did not improve for {self.cfg.early_stopping} epochs")
                break
        return self.history

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"acc {row['train_accuracy']:.4f}"]
    if row.get("val_loss") is not None:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
    parts += [f"{row['images_per_s']:.0f} img/s", f"lr {row['lr']:.2e}"]
    return "  ".join(parts)

