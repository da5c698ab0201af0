"""`--recipe fast`: from-scratch training for small images in the style of airbench.

Data stays in memory as uint8; each batch is translated (reflect-padded random crops) and flipped
on tensors ("alternating" flips: an image is mirrored in every other epoch, so two epochs see both
versions); a frozen patch-whitening first layer is fitted to the data; SGD with Nesterov momentum
on a summed, label-smoothed loss with a triangular learning-rate schedule; lookahead averaging of
the weights every few steps; the held-out images are scored on themselves and their mirror
(`--augment none` turns off translations and mirroring, `augment.horizontal_flip: false` the
mirroring, for data whose mirror image means something else). On a
CPU with AVX-512 BF16 the convolutions run in bfloat16 autocast (several times faster there;
bench/RESULTS.md); elsewhere in float32."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.loaders import SplitData, epoch_order
from ...data.transforms import Preprocess
from ...errors import UserError
from ...feature_bank import DEFAULT_BANK_SIZE
from ...inference import softmax_probabilities
from ...metrics import cross_entropy
from ...progress import Reporter
from ..balance import OFF, Balance
from ..checkpoint import save_checkpoint
from ..hooks import write_history
from ..precision import resolve_precision
from .. import budget as budget_plan
from . import FitResult, Job, Recipe
from .held_out import held_out_and_scores


@dataclass(frozen=True)
class FastHyper:
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples of summed loss, airbench's convention
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    translate: int = 2
    # mirrored images in training (alternating flips) and in the saved model's prediction (hflip
    # TTA); off for data whose mirror image means something else (digits, text, arrows)
    mirror: bool = True
    lookahead_every: int = 5
    epochs: int = 10  # the default; --epochs overrides it


def hyper_for(network: str) -> FastHyper:
    """airbench94's settings; for the wide network airbench95's changes: learning rate x0.87
    and 15 epochs (95% instead of 94% on the original CIFAR-10, for 3.9x the training compute)."""
    if network == "airbench-wide":
        return FastHyper(lr=11.5 * 0.87, epochs=15)
    return FastHyper()


def hyper_from(network: str, cfg) -> FastHyper:
    """The network's settings with what the run's config may change in them: label smoothing,
    and the mirroring and translations `augment` turns off."""
    hyp = hyper_for(network)
    if cfg.train.label_smoothing is not None:
        hyp = replace(hyp, label_smoothing=cfg.train.label_smoothing)
    if cfg.augment.policy == "none":
        hyp = replace(hyp, mirror=False, translate=0)
    elif not cfg.augment.horizontal_flip:
        hyp = replace(hyp, mirror=False)
    return hyp


def _standardize(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, -1, 1, 1) * 255
    return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def _crops(images: torch.Tensor, idx: torch.Tensor, size: int, shift: int, g: torch.Generator) -> torch.Tensor:
    """Random size x size crops (one offset per image) of the images at `idx`, reflect-padded by
    `shift`. Padded per batch, not once for the whole set: a padded copy of every training image
    would hold (1 + 2 * shift / size)^2 times their memory again for the whole run."""
    padded = F.pad(images[idx], (shift,) * 4, mode="reflect")
    n = len(idx)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    # one slice per offset, not an index per pixel: per-pixel int64 indices would take 8 times
    # the batch's memory again at every step
    crops = torch.empty((n, padded.shape[1], size, size), dtype=padded.dtype)
    for oy in range(2 * shift + 1):
        for ox in range(2 * shift + 1):
            at = ((dy == oy) & (dx == ox)).nonzero().flatten()
            if len(at):
                crops[at] = padded[at, :, oy:oy + size, ox:ox + size]
    return crops


class Lookahead:
    """Keeps an average of the weights; every few steps the model moves to it (airbench's EMA)."""

    def __init__(self, model: nn.Module):
        self.tensors = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        self.average = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for avg, t in zip(self.average, self.tensors):
            avg.lerp_(t, 1 - decay)
            t.copy_(avg)


def _param_groups(model, hyp: FastHyper, batch_size: int):
    """BatchNorm biases learn `bias_scaler` times faster. PyTorch's SGD multiplies the decay by
    the learning rate, so it is given as wd / lr: every weight then shrinks by the same `wd` per
    step whatever its learning rate (with BatchNorm, that decay sets the effective step size)."""
    kilostep = 1024 * (1 + 1 / (1 - hyp.momentum))
    lr = hyp.lr / kilostep
    wd = hyp.weight_decay * batch_size / kilostep
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ids = {id(p) for p in norm_biases}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    lr_biases = lr * hyp.bias_scaler
    return [dict(params=others, lr=lr, weight_decay=wd / lr, base_lr=lr),
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases, base_lr=lr_biases)]


def lr_factor(step: int, total: int) -> float:
    """Triangular: 0.2 -> 1 over the first 23% of steps, then down to 0.07."""
    t = step / max(1, total)
    return float(np.interp(t, [0, 0.23, 1], [0.2, 1.0, 0.07]))


@torch.no_grad()
def predict_mirrored(model: nn.Module, images: torch.Tensor, pre: Preprocess, dtype,
                     batch_size: int = 1000, mirror: bool = True) -> np.ndarray:
    """Probabilities averaged over the image and its mirror (the image alone without `mirror`),
    in `dtype` (the training's autocast): the per-epoch validation figure."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _standardize(images[start:start + batch_size], pre)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x).float()
            if mirror:
                logits = (logits + model(x.flip(-1)).float()) / 2
        out.append(softmax_probabilities(logits))
    return np.concatenate(out)


def batch_size_for(n: int, hyp: FastHyper) -> int:
    return min(hyp.batch_size, max(32, 2 ** int(math.log2(max(n // 8, 1)))))


def steps_per_epoch_for(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1


def steps_that_fit(done: int, planned: int, step_s: float, left_s: float) -> int:
    """How many optimizer steps the schedule can have in all, after `done` of `planned` took
    `step_s` each, when `left_s` seconds are left for training. Steps, not epochs: a short budget
    on a large set can stop inside the first epoch."""
    fits = int(left_s // max(step_s, 1e-6))
    return max(done, min(planned, done + fits))


def evaluation_seconds(held_out: int, n_train: int, rate: float) -> float:
    """What the run does after training, given training's `rate` images/s: the held-out images in
    two views (image and mirror), the unknown-answer bank's training images in one, and a few
    seconds of writing. A float32 forward pass runs at 2-2.5x the training rate (bench/RESULTS.md,
    "Time budget at 2 and 10 minutes"); 2x is assumed."""
    return (2 * held_out + min(n_train, DEFAULT_BANK_SIZE)) / max(2 * rate, 1e-6) + 10


# seconds of training between two looks at the budget (each one a little arithmetic)
BUDGET_CHECK_S = 5.0

# train settings the fast recipe has its own values for (airbench's optimizer, schedule and batch
# size, FastHyper): a value other than the config's default would be silently ignored, so it is
# refused instead. Label smoothing is not here: the recipe takes it (FastHyper's 0.2 when unset);
# nor are augment.policy and augment.horizontal_flip (see AUGMENT_TAKEN).
OWN_SETTINGS = {"batch_size": "--batch-size", "lr": "--lr", "optimizer": "--optimizer",
                "weight_decay": "--weight-decay", "momentum": "train.momentum", "schedule": "--schedule",
                "warmup_epochs": "--warmup-epochs", "step_size": "train.step_size", "gamma": "train.gamma",
                "plateau_patience": "train.plateau_patience", "early_stopping": "--early-stopping",
                "monitor": "--monitor"}


# what the fast recipe takes of the augment settings: policy "none" turns off its translations
# and mirroring, horizontal_flip false its mirroring; its other augmentation is airbench's own
AUGMENT_TAKEN = ("policy", "horizontal_flip")


def settings_it_would_ignore(cfg) -> list[str]:
    """The flags (or config keys) of `cfg` set to something the fast recipe does not use."""
    from dataclasses import fields
    from ...config import AugmentConfig, TrainConfig
    train, augment = TrainConfig(), AugmentConfig()
    named = [flag for field, flag in OWN_SETTINGS.items() if getattr(cfg.train, field) != getattr(train, field)]
    named += [f"augment.{f.name}" for f in fields(AugmentConfig) if f.name not in AUGMENT_TAKEN
              and getattr(cfg.augment, f.name) != getattr(augment, f.name)]
    if cfg.model.dropout is not None:  # airbench has no dropout
        named.append("--dropout")
    return named


class FastRecipe(Recipe):
    name = "fast"
    description = "airbench-style from-scratch training for small images, on the CPU"
    distributed = False  # one process: the whole dataset in memory, the batches built on tensors
    cpu_only = True  # autocast, whitening and TTA are written for the CPU
    default_budget_minutes = budget_plan.FAST_DEFAULT_MINUTES
    no_checkpoint_choice = "the fast recipe ends on its averaged weights"

    def model_name(self, cfg) -> str:
        return "airbench" if cfg.model.name == "auto" else cfg.model.name

    def check(self, cfg, family) -> None:
        if family.default_recipe(cfg.model.name, cfg.model) != "fast":
            raise UserError(f"--recipe fast trains its own network (airbench or airbench-wide); "
                            f"drop --model {cfg.model.name}")
        ignored = settings_it_would_ignore(cfg)
        if ignored:
            raise UserError(f"the fast recipe runs airbench's own optimizer, schedule and batch size, so "
                            f"{', '.join(ignored)} would have no effect: drop {'it' if len(ignored) == 1 else 'them'}, "
                            f"or train with --recipe scratch to set {'it' if len(ignored) == 1 else 'them'}")

    def fit(self, job: Job) -> FitResult:
        if not isinstance(job.data.train, SplitData):
            raise UserError("--recipe fast reads the training images from memory or from the decoded-image cache, "
                            "and the cache could not be written (see the warning above): free disk space in "
                            "PIXCLASS_CACHE_DIR or raise --max-memory")
        hyp = hyper_from(job.arch["name"], job.cfg)
        if job.cfg.train.label_smoothing is None:  # recorded, so config.yaml says what the run trained with
            job.record(job.cfg.replace("train", label_smoothing=hyp.label_smoothing))
        epochs = job.cfg.train.epochs
        # with the epochs left to the budget, the schedule shortens itself to the steps that fit (fit_fast)
        budget = job.budget if epochs is None else None
        result = fit_fast(job.model, job.data, epochs or hyp.epochs, job.cfg.train.seed,
                          job.cfg.train.precision, job.run_dir, job.reporter, hyp, budget, hooks=job.hooks,
                          balance=job.balance or OFF, max_steps=job.cfg.train.max_steps,
                          max_memory_gb=job.cfg.data.max_memory_gb)
        if budget is not None:
            n = len(job.data.train)
            planned = steps_per_epoch_for(n, batch_size_for(n, hyp)) * hyp.epochs
            run, steps = len(result.history), result.history[-1]["step"]
            job.record(job.cfg.replace("train", epochs=run, max_steps=steps if steps < planned else 0,
                                       plan=f"{budget.minutes:g} min budget: {steps} of the schedule's {planned} "
                                            f"steps ({run} of {hyp.epochs} epochs)"))
        return result


RECIPE = FastRecipe()


def fit_fast(model, data, epochs: int, seed: int, precision: str, run_dir: Path | None, reporter: Reporter,
             hyp: FastHyper = FastHyper(), budget=None, hooks=(), balance: Balance = OFF,
             max_steps: int = 0, max_memory_gb: float = float("inf")) -> FitResult:
    """Train `model` (an AirbenchNet) on data.train (in memory); held-out probabilities with the
    mirror averaged in.
    With a `budget` (train.budget.Budget), every few seconds the schedule is shortened to the steps
    that still fit it: the learning-rate and averaging curves are functions of the share of steps
    done, so they stretch to the new length and still end annealed. `max_steps` (> 0) caps the
    schedule from the start (a budget run's cut, rerun from its config.yaml). `hooks` get `after_epoch`
    (hooks.py) with no Trainer: this loop is its own. `balance`: class-weighted loss or
    class-balanced draws; the recipe picks no checkpoint (it ends on its averaged weights), so
    macro-F1 is reported, not monitored."""
    pre = data.preprocess
    dtype = resolve_precision(precision)
    train = data.train
    n, size = len(train), pre.size
    batch_size = batch_size_for(n, hyp)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.init_whitening(_standardize(train.images[torch.randperm(n, generator=g)[:5000]], pre))
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, hyp, batch_size), momentum=hyp.momentum, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(weight=balance.loss_weights(), label_smoothing=hyp.label_smoothing, reduction="sum")
    sample_weights = balance.sample_weights(train.labels)
    steps_per_epoch = steps_per_epoch_for(n, batch_size)
    planned = steps_per_epoch * epochs
    total = min(planned, max_steps) if max_steps else planned
    lookahead = Lookahead(model)
    flip_base = torch.rand(n, generator=g) < 0.5
    history, step = [], 0
    reporter.info(f"fast recipe: batch {batch_size}, {epochs} epochs, {total} steps, "
                  f"{'bfloat16' if dtype else 'float32'} on the CPU")
    started = time.perf_counter()
    held_out = sum(len(split) for split in (data.val, data.test) if split is not None)
    epoch, first_step_done, last_check = 0, None, None
    while step < total:
        epochs = math.ceil(total / steps_per_epoch)
        model.train()
        model.whiten.bias.requires_grad_(epoch < hyp.whiten_bias_epochs)
        order = epoch_order(n, True, g, sample_weights)
        flips = flip_base ^ bool(epoch % 2) if hyp.mirror else torch.zeros(n, dtype=torch.bool)
        t0, seen, total_loss, correct = time.perf_counter(), 0, 0.0, 0
        with reporter.bar(f"epoch {epoch + 1}/{epochs}", steps_per_epoch * batch_size, stats=True) as bar:
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[b * batch_size:(b + 1) * batch_size]
                x = _crops(train.images, idx, size, hyp.translate, g) if hyp.translate else train.images[idx]
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
                x = _standardize(x, pre)
                y = train.labels[idx]
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(step, total)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step % hyp.lookahead_every == 0:
                    lookahead.update(0.95 ** hyp.lookahead_every * (step / total) ** 3)
                now = time.perf_counter()
                if step == 1:
                    first_step_done = last_check = now  # the first step also builds the kernels: not counted
                elif budget is not None and (now - last_check >= BUDGET_CHECK_S or b == steps_per_epoch - 1
                                             or budget.left() <= 0):
                    last_check = now
                    step_s = (now - first_step_done) / (step - 1)
                    left = budget.left() - evaluation_seconds(held_out, n, batch_size / step_s)
                    fitting = steps_that_fit(step, total, step_s, left)
                    if fitting < total:
                        if total == planned:
                            reporter.info(f"time budget: the schedule shortened to {fitting} of {planned} steps "
                                          f"({fitting / steps_per_epoch:.1f} of {epochs} epochs)")
                        total = fitting
                seen += len(idx)
                total_loss += loss.item()
                correct += (logits.argmax(1) == y).sum().item()
                bar.advance(len(idx), f"loss {total_loss / seen:.4f} acc {correct / seen:.4f} "
                                      f"{seen / (time.perf_counter() - t0):.0f} img/s")
        row = {"epoch": epoch + 1, "phase": "fast", "lr": optimizer.param_groups[0]["lr"],
               "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "epoch_s": round(time.perf_counter() - t0, 2),
               "images_per_s": round(seen / (time.perf_counter() - t0), 1), "val_loss": None, "val_accuracy": None,
               "elapsed_s": round(time.perf_counter() - started, 1), "step": step}
        if data.val is not None and len(data.val):
            probs = predict_mirrored(model, data.val.images, pre, dtype, mirror=hyp.mirror)
            row["val_loss"] = cross_entropy(data.val.labels.numpy(), probs)
            row["val_accuracy"] = float((probs.argmax(1) == data.val.labels.numpy()).mean())
        history.append(row)
        if run_dir is not None:
            write_history(history, Path(run_dir) / "metrics.csv")
        for hook in hooks:
            hook.after_epoch(None, row, step >= total)
        reporter.info("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                if v is not None and k not in ("phase",)))
        epoch += 1
    if total < planned and budget is not None:
        begun = f"{epoch} epoch{'s' if epoch != 1 else ''}"
        reporter.info(f"time budget: trained {step} of the schedule's {planned} steps ({begun} begun)")
    lookahead.update(1.0)  # finish on the averaged weights
    model.eval()
    if run_dir is not None:
        save_checkpoint({"model": model.state_dict(), "epoch": epoch, "step": step, "history": history},
                        Path(run_dir) / "checkpoints" / "last.pt")
    timings = {"train_s": round(time.perf_counter() - started, 1)}
    t0 = time.perf_counter()
    # the run reports what its saved model gives (`pixclass evaluate`): the artifact averages the
    # image and its mirror ("hflip", unless mirroring is off), in float32; calibration reuses this pass
    tta = "hflip" if hyp.mirror else "none"
    result, scores = held_out_and_scores(model, data, tta, max_memory_gb)
    if result is None:
        return FitResult(history, None, skipped=list(data.skipped), timings=timings, cached_scores=scores)
    timings["tta_s"] = round(time.perf_counter() - t0, 1)
    return FitResult(history, result, skipped=list(data.skipped), timings=timings, tta=tta,
                     metrics={"tta": tta}, cached_scores=scores)
