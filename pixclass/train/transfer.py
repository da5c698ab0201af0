"""Transfer learning: train the guide's head on a frozen pretrained backbone, then fine-tune.

The backbone is cut into a frozen part and a trainable tail. The frozen part runs once per image
(and per augmented view) and its output is cached, so no epoch ever recomputes it:
- head phase: the tail is frozen too; pooled features are computed once from the cache and only
  the head trains (milliseconds per epoch);
- fine-tune phase: the tail (by default the units at the backbone's last resolution) trains with
  the head on the cached features, with discriminative learning rates (lower for earlier units),
  as fastai's `fine_tune` does; `--unfreeze all` fine-tunes the whole network on images.
`--freeze` (or 0 epochs) stops after the head phase: a pure feature extractor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data.transforms import build_augment
from ..models.transfer import TransferModel, default_cut
from ..progress import Reporter
from ..data.loaders import SplitData
from .features import FeatureInputs, extract_features
from .loop import ImageInputs, Trainer

FINETUNE_EPOCHS = 4


class Tail(nn.Module):
    """Units [cut, end) of the backbone, pooling and head: cached features -> logits."""

    def __init__(self, model: TransferModel, cut: int):
        super().__init__()
        self.model, self.cut = model, cut
        self.units = nn.ModuleList(model.units[cut:]) if model.units is not None and cut < model.n_units else nn.ModuleList()

    def forward(self, x):
        return self.model.forward_from(self.cut, x)

    def param_groups(self, lr_ratio: float) -> list[dict]:
        """Earliest unit at lr * lr_ratio, rising geometrically to the head at lr."""
        units = [u for u in self.units if any(p.requires_grad for p in u.parameters())]
        n = len(units)
        groups = [{"params": list(u.parameters()), "lr_scale": lr_ratio ** ((n - i) / n)} for i, u in enumerate(units)]
        return groups + [{"params": list(self.model.head.parameters()), "lr_scale": 1.0}]


@dataclass
class TransferResult:
    history: list[dict]
    held_out: tuple[np.ndarray, np.ndarray] | None  # (probabilities, labels) on test (or val)
    held_out_split: str | None
    held_out_paths: list
    skipped: list
    timings: dict


def choose_cut(model: TransferModel, cfg: RunConfig, size: int) -> int:
    tc = cfg.train
    if tc.freeze or finetune_epochs(cfg) == 0:
        return model.n_units
    if tc.unfreeze == "all":
        return 0
    if tc.unfreeze == "auto":
        return default_cut(model)
    return max(0, model.n_units - int(tc.unfreeze))


def finetune_epochs(cfg: RunConfig) -> int:
    if cfg.train.freeze:
        return 0
    return FINETUNE_EPOCHS if cfg.train.epochs is None else cfg.train.epochs


@torch.inference_mode()
def _through(module_fn, split: SplitData, device: torch.device, batch_size: int | None = None) -> SplitData:
    """Apply a frozen function (on the model's device) to every view of every cached feature.
    Batches of 32 on a CPU: EfficientNet-Lite0's tail ran 2x faster than at 256 (cache-sized)."""
    batch_size = batch_size or (32 if device.type == "cpu" else 256)
    n, v = split.images.shape[:2]
    flat = split.images.flatten(0, 1)
    out = torch.cat([module_fn(flat[i:i + batch_size].to(device)).cpu()
                     for i in range(0, len(flat), batch_size)]) if len(flat) else flat
    return SplitData(out.view(n, v, *out.shape[1:]), split.labels, split.paths)


@torch.inference_mode()
def _probabilities(module: nn.Module, split: SplitData) -> np.ndarray:
    module.eval()
    return torch.cat([torch.softmax(module(x[:, 0]), 1) for x, _, _ in split.batches(256)]).numpy()


def fit_transfer(model: TransferModel, data, cfg: RunConfig, run_dir, reporter: Reporter, extra: dict,
                 decoding=None, dist=None, device: torch.device | None = None) -> TransferResult:
    """`decoding`: a DecodeAhead already decoding the run's files (see extract_features). Under
    torchrun (`dist`) every rank computes the features of its share of the files, all ranks then
    hold all of them, the phases train with DDP, and only rank 0 writes (`run_dir` elsewhere None)."""
    import time
    from .distributed import Dist
    dist = dist or Dist()
    device = torch.device(device or "cpu")
    if not dist.main:
        run_dir = None
    model.to(device)
    tc, pre = cfg.train, data.preprocess
    augment = build_augment(cfg.augment)
    cut, n_units = choose_cut(model, cfg, pre.size), model.n_units
    frozen_cut = cut if cut > 0 else n_units  # cut 0 fine-tunes on images; the head still trains on features
    timings = {}
    t0 = time.perf_counter()
    model.eval()
    parts = {name: (part.paths, part.labels, tc.feature_views if name == "train" else 0)
             for name in ("train", "val", "test") if (part := getattr(data, name)) is not None and len(part)}
    extracted, skipped = extract_features(model, frozen_cut, parts, pre, augment, tc.seed, reporter, decoding=decoding,
                                          dist=dist)
    splits = {name: extracted.get(name) for name in ("train", "val", "test")}
    timings["features_s"] = round(time.perf_counter() - t0, 2)
    if splits["train"] is None or len(splits["train"]) == 0:
        from ..errors import DatasetError
        raise DatasetError(f"no readable training images in {cfg.data.path}")

    # head phase on pooled features
    t1 = time.perf_counter()
    if frozen_cut < n_units:
        tail = Tail(model, frozen_cut)
        for module in tail.units:
            module.eval()
        pooled = {k: _through(lambda f: model.pooled(_run_units(tail.units, f)), s, device) if s is not None else None
                  for k, s in splits.items()}
    else:
        pooled = splits
    history: list[dict] = []
    head_cfg = dataclasses.replace(tc, epochs=tc.head_epochs)
    if tc.head_epochs > 0:
        torch.manual_seed(tc.seed)  # dropout draws the same whether or not features came from the cache
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        trainer = Trainer(model.head, pooled["train"], pooled["val"], head_cfg, FeatureInputs(), run_dir, reporter,
                          phase="head", extra=extra, history=history, saved_model=model,
                          last_phase=finetune_epochs(cfg) == 0, channels_last=False, dist=dist, device=device,
                          final_curves=False)
        trainer.fit()
        trainer.restore_best()
    timings["head_s"] = round(time.perf_counter() - t1, 2)

    # fine-tune phase
    t2 = time.perf_counter()
    epochs = finetune_epochs(cfg)
    final = model.head
    final_splits = pooled
    if epochs > 0:
        torch.manual_seed(tc.seed + 1)
        for p in model.parameters():
            p.requires_grad_(True)
        ft_cfg = dataclasses.replace(tc, epochs=epochs, lr=tc.finetune_lr or tc.lr / 2,
                                     schedule="cosine" if tc.schedule == "constant" else tc.schedule)
        if cut == 0:  # the whole network trains: decode the images and run it end to end
            images = {k: _decoded(getattr(data, k), pre, reporter) for k in ("train", "val", "test")}
            trainer = Trainer(model, images["train"], images["val"], ft_cfg, ImageInputs(pre, augment),
                              run_dir, reporter, phase="finetune", extra=extra, history=history, dist=dist,
                              device=device, final_curves=False)
        else:
            tail = Tail(model, cut)
            trainer = Trainer(tail, splits["train"], splits["val"], ft_cfg, FeatureInputs(), run_dir, reporter,
                              phase="finetune", extra=extra, history=history,
                              param_groups=tail.param_groups(tc.lr_ratio), saved_model=model, channels_last=False,
                              dist=dist, device=device, final_curves=False)
            final, final_splits = tail, splits
        trainer.fit()
        trainer.restore_best()
    timings["finetune_s"] = round(time.perf_counter() - t2, 2)
    model.cpu().eval()  # evaluation, the artifact and the report work on the CPU copy

    held_name = "test" if final_splits.get("test") is not None else "val" if final_splits.get("val") is not None else None
    held, held_paths = None, []
    if held_name and cut == 0 and epochs > 0:
        from ..inference import predict_batches
        probs, labels, _ = predict_batches(model, images[held_name].batches(64), pre)
        held, held_paths = (probs, labels), images[held_name].paths
    elif held_name:
        split = final_splits[held_name]
        held, held_paths = (_probabilities(final, split), split.labels.numpy()), split.paths
    return TransferResult(history, held, held_name, held_paths, skipped, timings)


def _decoded(part, pre, reporter):
    if part is None or len(part) == 0:
        return None
    from ..data.loaders import load_split
    split, _ = load_split(part.paths, part.labels, pre, reporter, what="loading images")
    return split


def _run_units(units, x):
    for unit in units:
        x = unit(x)
    return x
