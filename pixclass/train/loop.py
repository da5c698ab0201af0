"""The training loop: epochs of batched, augmented steps, validation, early stopping and resume.
What happens around it (checkpoints, the history file) is given as hooks (hooks.py)."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.transforms import BatchAugment, Preprocess, batch_to_input
from ..errors import UserError
from ..inference import softmax_probabilities
from ..metrics import DEFAULT_THRESHOLD, average_precision, binary_cross_entropy, cross_entropy, macro_f1
from ..progress import Reporter
from .balance import OFF, Balance
from .checkpoint import load_checkpoint
from .early_stopping import EarlyStopping
from .optim import LRSchedule, build_optimizer


class NonFiniteLossError(UserError):
    pass


def set_threads(threads: int | None, processes_per_node: int = 1) -> None:
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // processes_per_node))


class ImageInputs:
    """uint8 image batches -> model input; augmented when a generator is given (training)."""

    memory_format = torch.channels_last  # PyTorch's CPU convolutions over images are faster in it

    def __init__(self, pre: Preprocess, augment: BatchAugment | None = None):
        self.pre, self.augment = pre, augment

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return batch_to_input(batch, self.pre, self.augment if generator is not None else None, generator)


class Trainer:
    """Trains `model` on `train`, validating on `val` if given.

    `train` and `val` are splits (anything with `__len__`, `labels` and `batches(size, shuffle, generator,
    skip, sample_weights)`
    yielding (inputs, labels, indices)); `inputs` turns a batch's inputs into the model's input
    (decoded images through preprocessing and augmentation, or cached features) and says the
    memory format the model runs in. `param_groups` gives per-group learning-rate multipliers;
    `history` may be shared between phases of one run; `hooks` see every step and epoch.
    `balance` (balance.py): class-weighted loss or class-balanced draws, and the checkpoint
    picked by validation macro-F1.

    Multi-label splits (labels multi-hot N x K) train with binary cross-entropy on each logit;
    validation adds `val_map` (mean average precision), which picks the checkpoint, and
    `val_macro_f1` at DEFAULT_THRESHOLD (the tuned thresholds come after training)."""

    def __init__(self, model: nn.Module, train, val, cfg: TrainConfig, inputs, reporter: Reporter | None = None,
                 hooks=(), phase: str = "train", history: list | None = None, param_groups: list[dict] | None = None,
                 dist=None, device: torch.device | None = None, deadline: float | None = None, adversary=None,
                 balance: Balance | None = None):
        """`adversary`: model -> an attack (adversarial.FastAdversary) whose versions of the
        training batches the steps learn from (adversarial training), made once the model is on
        its device."""
        self.device = torch.device(device or "cpu")
        # time.perf_counter() by which the phase must end (a run's --budget): an epoch that would
        # end after it is not started, so the phase stops with its best epoch so far
        self.deadline = deadline
        self.model = model.to(self.device).to(memory_format=getattr(inputs, "memory_format", torch.contiguous_format))
        from .distributed import Dist
        from .precision import training_autocast
        self.dist = dist or Dist()
        self.ddp = None
        if self.dist.enabled:  # gradients averaged across ranks by DDP itself
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.amp_dtype = training_autocast(cfg.precision, self.device)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.adversary = adversary(self.model) if adversary is not None else None
        self.train, self.val, self.cfg, self.inputs = train, val, cfg, inputs
        self.reporter = reporter or Reporter()
        self.hooks, self.phase = list(hooks), phase
        self.balance = balance or OFF
        weight = self.balance.loss_weights()
        weight = weight.to(self.device) if weight is not None else None
        self.multilabel = train.labels.ndim == 2
        if self.multilabel:
            self.loss_fn, self.loss_sum = nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum")
        else:
            self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing or 0.0)
            self.loss_sum = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing or 0.0, reduction="sum")
        self.sample_weights = self.balance.sample_weights(train.labels)
        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.optimizer = build_optimizer([{**g, "lr": cfg.lr * g.pop("lr_scale", 1.0)} for g in param_groups], cfg)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.schedule = LRSchedule(self.optimizer, cfg, self.steps_per_epoch)
        monitor = MULTILABEL_MONITOR if self.multilabel else self.balance.monitor(cfg.monitor)
        self.stopper = EarlyStopping(monitor if val is not None and len(val) else "none", cfg.early_stopping)
        self.history = history if history is not None else []
        self.epoch_offset = len(self.history)  # epochs of earlier phases
        self.epoch, self.step = 0, 0
        self.best_state, self.improved = None, False
        self._position = None  # where a mid-epoch checkpoint left off: batch, generator state, sums

    # -- state, for checkpoints and resume ----------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "stopper": self.stopper.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history, "phase": self.phase,
                "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "position": self._position, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.stopper.load_state_dict(state["stopper"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history[:] = list(state["history"])
        self.epoch_offset = len(self.history) - self.epoch
        self._position = state.get("position")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])

    def resume(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))
        best = Path(path).with_name("best.pt")
        if best.is_file():
            self.best_state = load_checkpoint(best)["model"]
        if self.epoch >= self.cfg.epochs:
            self.reporter.info(f"{path}: all {self.cfg.epochs} epochs were done; saving and evaluating")
            return
        where = f", batch {self._position['batch'] + 1}" if self._position else ""
        self.reporter.info(f"resumed from {path} at epoch {self.epoch + 1}{where}")

    def _call_hooks(self, event: str, *args) -> None:
        for hook in self.hooks:
            method = getattr(hook, event, None)
            if method is not None:
                method(self, *args)

    # -- the loop ----------------------------------------------------------------------------
    def _train_epoch(self, generator: torch.Generator) -> dict:
        """One epoch; continues from a mid-epoch checkpoint's position when there is one."""
        self.model.train()
        position, self._position = self._position, None
        start_batch = position["batch"] if position else 0
        total_loss, correct, seen, earlier_s = position["sums"] if position else (0.0, 0, 0, 0.0)
        t0 = time.perf_counter() - earlier_s
        label = f"{self.phase} epoch {self.epoch + 1}/{self.cfg.epochs}" if self.phase != "train" else \
            f"epoch {self.epoch + 1}/{self.cfg.epochs}"
        batch_no = start_batch
        with self.reporter.bar(label, len(self.train), stats=True) as bar:
            bar.advance(min(len(self.train), start_batch * self.cfg.batch_size))
            batches = self.train.batches(self.cfg.batch_size, shuffle=True, generator=generator, skip=start_batch,
                                         sample_weights=self.sample_weights)
            for images, labels, idx in batches:
                if position is not None:  # the shuffle is drawn; now the generator as it was at the kill
                    generator.set_state(position["generator"])
                    position = None
                batch_no += 1
                if len(labels) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                self.schedule.apply(self.step)
                x = self.inputs(images, generator)  # the whole global batch: augmentation as in one process
                global_batch = len(labels)
                if self.dist.enabled:  # this rank's slice
                    part = self.dist.shard(global_batch)
                    x, labels, idx = x[part], labels[part], idx[part]
                x, labels = x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if self.adversary is not None:  # the step learns from the batch's adversarial version
                    x = self.adversary(x, labels, generator)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    if self.dist.enabled:
                        # the summed loss scaled by world / global batch makes DDP's gradient
                        # average exactly the gradient of the mean loss over the whole batch
                        logits = self.ddp(x)
                        summed = self.loss_sum(logits.float(), labels)
                        if self.multilabel:  # summed over the K outputs too: the mean is per output
                            summed = summed / labels.shape[1]
                        loss = summed * self.dist.world / global_batch
                        batch_loss = summed.item()
                    else:
                        logits = self.model(x)
                        loss = self.loss_fn(logits.float(), labels)
                        batch_loss = None
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at step {self.step} (epoch {self.epoch + 1}, batch {batch_no}); "
                        f"batch files: {self._batch_files(idx)}; last good checkpoint kept; try a lower learning rate")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                n = len(labels)
                total_loss += batch_loss if batch_loss is not None else loss.item() * n
                correct += self._correct(logits, labels)
                seen += n
                rate = seen / (time.perf_counter() - t0)
                bar.advance(n, f"loss {total_loss / seen:.4f} acc {correct / seen:.4f} {rate:.0f} img/s")
                if batch_no < self.steps_per_epoch:
                    self._position = {"batch": batch_no, "generator": generator.get_state(),
                                      "sums": (total_loss, correct, seen, time.perf_counter() - t0)}
                    self._call_hooks("after_step")
                    self._position = None
        elapsed = time.perf_counter() - t0
        if self.dist.enabled:  # every rank saw its slice: the epoch's figures are the sums over ranks
            total_loss, correct, seen = self.dist.all_sum([total_loss, correct, seen])
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "epoch_s": round(elapsed, 3), "images_per_s": round(seen / max(elapsed, 1e-9), 1)}

    def _correct(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Right answers in a batch: images whose top class is their label, or for multi-label the
        share of each image's K yes/no answers that are right (summed over the images)."""
        if self.multilabel:
            return ((logits > 0) == (labels > 0.5)).float().mean(1).sum().item()
        return (logits.argmax(1) == labels).sum().item()

    def _batch_files(self, idx: torch.Tensor, limit: int = 8) -> str:
        paths = getattr(self.train, "paths", None)
        if not paths:
            return "(not known)"
        names = [str(paths[i]) for i in idx[:limit].tolist()]
        return ", ".join(names) + (f" and {len(idx) - limit} more" if len(idx) > limit else "")

    @torch.inference_mode()
    def validate(self) -> dict:
        """Validation loss and accuracy of the model as it is now."""
        if self.val is None or len(self.val) == 0:
            extra = {"val_macro_f1": None, "val_map": None} if self.multilabel else \
                {"val_macro_f1": None} if self.balance.active else {}
            return {"val_loss": None, "val_accuracy": None, **extra}
        self.model.eval()
        probs, labels = [], []
        for x, y, _ in self.val.batches(256):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                logits = self.model(self.inputs(x, None).to(self.device, non_blocking=True))
            probs.append(softmax_probabilities(logits, self.multilabel))
            labels.append(y)
        probs, labels = np.concatenate(probs), torch.cat(labels).numpy()
        if self.multilabel:
            return _multilabel_validation(labels, probs)
        row = {"val_loss": cross_entropy(labels, probs), "val_accuracy": float((probs.argmax(1) == labels).mean())}
        if self.balance.active:
            row["val_macro_f1"] = macro_f1(labels, probs.argmax(1), [str(i) for i in range(probs.shape[1])])
        return row

    def fit(self) -> list[dict]:
        set_threads(self.cfg.threads, self.dist.local_world)
        while self.epoch < self.cfg.epochs:
            # one generator per epoch, seeded by (seed, epoch): shuffling and augmentation of an
            # epoch are the same whether the run was interrupted and resumed or not
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            self._epoch_started = time.perf_counter()
            row = {"epoch": self.epoch_offset + self.epoch + 1, "phase": self.phase}
            row.update(self._train_epoch(generator))
            row["lr"] = self.optimizer.param_groups[-1]["lr"]  # the last group: the head's
            row.update(self.validate())
            self.schedule.epoch_end(row["val_loss"])
            self.improved = self.stopper.update(row)
            if self.improved:
                self.best_state = copy.deepcopy(self.model.state_dict())
            self.history.append(row)
            self.epoch += 1
            self._call_hooks("after_epoch", row, self.epoch >= self.cfg.epochs or self.stopper.should_stop)
            self.reporter.info(_epoch_line(row))
            if self.stopper.should_stop:
                self.reporter.info(f"early stopping: {self.stopper.monitor} did not improve for {self.cfg.early_stopping} epochs")
                break
            if self._out_of_time(row):
                self.reporter.info(f"time budget: {self.phase} stops after {self.epoch} of {self.cfg.epochs} epochs")
                break
        return self.history

    def _out_of_time(self, last: dict) -> bool:
        """Whether another epoch like the last one (training and validation) would end after the
        deadline."""
        if self.deadline is None or self.epoch >= self.cfg.epochs:
            return False
        epoch_s = time.perf_counter() - self._epoch_started
        return time.perf_counter() + epoch_s > self.deadline

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


# what picks a multi-label run's checkpoint: threshold-free, so the thresholds tuned after training
# do not decide which weights they are tuned for
MULTILABEL_MONITOR = "val_map"


def _multilabel_validation(labels: np.ndarray, probs: np.ndarray) -> dict:
    """A multi-label validation row: binary cross-entropy, the share of right yes/no answers,
    macro-F1 at DEFAULT_THRESHOLD and mAP over the classes with a positive image."""
    predicted, positive = probs >= DEFAULT_THRESHOLD, labels > 0.5
    present = [j for j in range(labels.shape[1]) if positive[:, j].any()]
    f1 = [2 * (predicted[:, j] & positive[:, j]).sum() / max(predicted[:, j].sum() + positive[:, j].sum(), 1)
          for j in present]
    return {"val_loss": binary_cross_entropy(labels, probs), "val_accuracy": float((predicted == positive).mean()),
            "val_macro_f1": float(np.mean(f1)) if f1 else 0.0,
            "val_map": float(np.mean([average_precision(positive[:, j], probs[:, j]) for j in present]))
            if present else 0.0}


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"acc {row['train_accuracy']:.4f}"]
    if row.get("val_loss") is not None:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
        if row.get("val_macro_f1") is not None:
            parts.append(f"val_macro_f1 {row['val_macro_f1']:.4f}")
        if row.get("val_map") is not None:
            parts.append(f"val_mAP {row['val_map']:.4f}")
    parts += [f"{row['images_per_s']:.0f} img/s", f"lr {row['lr']:.2e}"]
    return "  ".join(parts)

