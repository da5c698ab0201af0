"""Recipes: the ways pixclass trains a network. Every recipe takes one `Job` (the prepared data,
the model and the config) and returns one `FitResult`; run.py does everything else (ranks, the
artifact, evaluation, the report) once, for all of them. A new recipe is a new file with a
`RECIPE` object, named in RECIPE_MODULES."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ...config import DataConfig, RunConfig
from ...errors import UserError

RECIPE_MODULES = {"scratch": "scratch", "transfer": "transfer", "fast": "fast", "fewshot": "fewshot"}


@dataclass
class HeldOut:
    """Probabilities on the held-out split (test, or val when there is no test split)."""
    split: str
    probabilities: np.ndarray  # N x classes
    labels: np.ndarray  # N
    paths: list


@dataclass
class FitResult:
    history: list[dict]
    held_out: HeldOut | None
    skipped: list = field(default_factory=list)  # (path, reason) of files that could not be read
    timings: dict = field(default_factory=dict)  # seconds per phase
    metrics: dict = field(default_factory=dict)  # recipe-specific fields for the metrics and report
    # the test-time augmentation (tta.TTA_MODES) the saved model is used with; `held_out` must have
    # been computed with it, so that the run's figure is what `pixclass evaluate` gives
    tta: str = "none"
    # the final model's accuracy on the validation split, as the held-out figure is computed (its
    # test-time augmentation included): what `pixclass tune` selects on, never the test split.
    # None: the recipe does not compute it (see validation_accuracy)
    val_accuracy: float | None = None
    # where the recipe can give calibration the final network's logits and penultimate features
    # without running it on images again (calibrate.CachedScores), else None
    cached_scores: object | None = None


def validation_accuracy(result: FitResult) -> float | None:
    """The final model's validation accuracy: the recipe's own figure, else the held-out one when
    the held-out split is val, else the last epoch's (what the recipe kept)."""
    if result.val_accuracy is not None:
        return result.val_accuracy
    held = result.held_out
    if held is not None and held.split == "val" and len(held.labels):
        return float((held.probabilities.argmax(1) == held.labels).mean())
    rows = [r for r in result.history if r.get("val_accuracy") is not None]
    return rows[-1]["val_accuracy"] if rows else None


@dataclass
class SweepTarget:
    """What a learning-rate range test trains: `module` on `train` (a split, see loop.Trainer)
    through `inputs`, with `param_groups` (per-group `lr_scale`) as the recipe's first phase has them."""
    module: nn.Module
    train: object
    inputs: object
    param_groups: list | None = None


@dataclass
class Job:
    """Everything a recipe gets. `run_dir` is None on ranks other than 0: they write nothing."""
    model: nn.Module
    arch: dict
    data: object  # data.dataset.PreparedData
    cfg: RunConfig
    run_dir: Path | None
    reporter: object
    dist: object  # train.distributed.Dist
    device: object
    resume_from: Path | None = None
    early: object = None  # what the recipe's `start_early` began (e.g. decoding ahead)
    budget: object = None  # train.budget.Budget: the run's time budget, from its start
    # hooks of the whole run (experiment tracking; `pixclass tune`'s report of each epoch to its
    # trial) that every recipe adds to its own, in every phase; empty on ranks other than 0
    hooks: list = field(default_factory=list)
    balance: object = None  # train.balance.Balance: how training counters class imbalance

    def record(self, cfg: RunConfig) -> None:
        """Take `cfg` (with what the recipe planned once training began) as the run's config, and
        write it to the run folder's config.yaml, so `--config` reruns the same plan."""
        self.cfg = cfg
        if self.run_dir is not None:
            cfg.save_yaml(Path(self.run_dir) / "config.yaml")

    @property
    def checkpoint_extra(self) -> dict:
        """What a checkpoint carries besides the loop state: enough to resume the run."""
        return {"preprocess": self.data.preprocess.to_dict(), "arch": self.arch, "classes": self.data.classes}


class Recipe:
    name = ""
    description = ""
    decodes_images = True  # False: the recipe reads the files itself (prepare_data only lists them)
    distributed = True  # False: under torchrun rank 0 trains alone and the other ranks exit at once
    resumable = False  # whether `--resume` can continue an interrupted run
    restart_note = "it trains in minutes; start it again"  # said when --resume is refused
    cpu_only = False  # True: runs on the CPU whatever device is available
    default_budget_minutes: float | None = None  # the time budget without --budget (None: none)
    adversarial = False  # whether `--adversarial` can train with it (its steps must see whole images)
    no_checkpoint_choice = ""  # why the recipe picks no best checkpoint on validation (empty: it does)
    multilabel = False  # whether it trains multi-label data (sigmoid outputs, binary cross-entropy)

    def model_name(self, cfg: RunConfig) -> str:
        """The network to train when the user named this recipe: `cfg.model.name`, with "auto"
        standing for the recipe's own choice."""
        from ...config import DEFAULT_MODEL
        return DEFAULT_MODEL if cfg.model.name == "auto" else cfg.model.name

    def check(self, cfg: RunConfig, family) -> None:
        """Raise a UserError when this recipe cannot train `cfg.model.name`."""

    def plan(self, cfg: RunConfig, scanned, budget, model_chosen: bool, reporter) -> RunConfig:
        """`cfg` with what the recipe plans for the time budget written into its fields (called
        once the data is scanned, before anything is decoded). `model_chosen`: the network was not
        named by the user, so the plan may choose it."""
        return cfg

    def start_early(self, cfg: RunConfig, family, scanned, dist):
        """Work to begin before the model is built (the model's import can take seconds); its
        handle reaches `fit` as `job.early`."""
        return None

    def fit(self, job: Job) -> FitResult:
        raise NotImplementedError

    def sweep_target(self, job: Job) -> SweepTarget:
        """What `lr` drives in this recipe, for the learning-rate range test (train/lr_find.py)."""
        raise UserError(f"the learning-rate finder is not available for the {self.name} recipe")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPE_MODULES:
        raise UserError(f"unknown recipe {name!r} (one of {', '.join(RECIPE_MODULES)})")
    return importlib.import_module(f"{__package__}.{RECIPE_MODULES[name]}").RECIPE


def held_out_split(splits: dict) -> tuple[str, object] | tuple[None, None]:
    """(name, split) of the split a run is judged on, from {"train": ..., "val": ..., "test": ...}:
    test, else val; (None, None) without either."""
    for name in ("test", "val"):
        split = splits.get(name)
        if split is not None and len(split):
            return name, split
    return None, None


# "auto" trains the fast from-scratch recipe on images whose median side is at most this many
# pixels: pretrained backbones want ~224 px and only see upsampled blur in smaller images
SMALL_IMAGE_SIDE = 64
# "auto" fits the few-shot recipe (prototypes or a linear head on pretrained embeddings) where
# transfer learning would be chosen and no training class has more images than this
FEW_SHOT_IMAGES = 10


def choose_recipe(cfg: RunConfig, dist=None):
    """(cfg with the model and recipe resolved, the model's family, the recipe). With neither named
    the images decide (`recipe_for_data`); with a model named and no recipe, the model's family
    picks it; "auto" as model is the recipe's own network (DEFAULT_MODEL for transfer). The
    resolved names go into config.yaml, so `--config` reruns the same recipe."""
    from ...data.scan import is_multilabel_dataset
    from ...models.registry import family_for
    multilabel = is_multilabel_dataset(cfg.data.path)
    if cfg.train.recipe in ("auto", "standard") and cfg.model.name == "auto":
        cfg = recipe_for_multilabel(cfg) if multilabel else recipe_for_data(cfg, dist)
    if cfg.train.recipe in ("auto", "standard"):  # "standard": the name configs of pixclass 0.1 used
        name = cfg.model.name
        family = family_for(name, cfg.model)
        recipe = get_recipe(family.default_recipe(name, cfg.model))
    else:
        recipe = get_recipe(cfg.train.recipe)
        name = recipe.model_name(cfg)
        family = family_for(name, cfg.model)
    cfg = cfg.replace("model", name=family.canonical(name)).replace("train", recipe=recipe.name)
    recipe.check(cfg, family)
    if multilabel:
        check_multilabel(cfg, recipe)
    if cfg.train.adversarial and not recipe.adversarial:
        raise UserError(f"--adversarial attacks whole images at every step, which the {recipe.name} recipe does not "
                        f"train on: use the scratch recipe (--model classic-cnn, or a timm architecture with "
                        f"--recipe scratch)")
    return cfg, family, recipe


MULTILABEL_MODEL = "classic-cnn"


def recipe_for_multilabel(cfg: RunConfig) -> RunConfig:
    """A multi-label dataset trains from scratch (the one recipe with sigmoid outputs) on the
    classic CNN, unless a model is named."""
    return cfg.replace("model", name=MULTILABEL_MODEL).replace(
        "train", recipe="scratch", recipe_reason=f"multi-label data (several tags per image): sigmoid outputs, "
                                                  f"scratch recipe on {MULTILABEL_MODEL}")


def check_multilabel(cfg: RunConfig, recipe: Recipe) -> None:
    """A UserError for what multi-label data cannot train with."""
    if not recipe.multilabel:
        raise UserError(f"{cfg.data.path} is multi-label (several tags per image), which the {recipe.name} recipe "
                        f"does not train: use --recipe scratch (e.g. --model {MULTILABEL_MODEL})")
    if cfg.train.adversarial:
        raise UserError("--adversarial attacks single-label answers; it is not available for multi-label data")


# the share of train/ the fast recipe keeps out for calibration and the abstain threshold when the
# data has train/ and test/ only: enough images for a 5% quantile, few taken from training
FAST_VALIDATION = 0.05


def recipe_for_data(cfg: RunConfig, dist=None) -> RunConfig:
    """`cfg` with the recipe ("fast", "transfer" or "fewshot") and the reason for it (`recipe_reason`) chosen
    from the median side of a sample of the training images' headers: the fast recipe for small
    images, transfer learning otherwise. With the fast recipe, a dataset given as train/ and test/
    folders keeps only a small validation split out of train/ (at the default split): the recipe
    selects nothing on it, but the calibration temperature and the abstain threshold are fitted on
    it (never on test/, which judges the run)."""
    recipe, reason, probe = _recipe_for_sizes(cfg, dist)
    cfg = cfg.replace("train", recipe=recipe, recipe_reason=reason)
    if (recipe == "fast" and "test" in probe.split_folders and "val" not in probe.split_folders
            and cfg.data.split == DataConfig().split):
        cfg = cfg.replace("data", split=(1 - FAST_VALIDATION, FAST_VALIDATION, 0.0)).replace(
            "train", recipe_reason=reason + f", on {1 - FAST_VALIDATION:.0%} of train/ (the rest calibrates, test/ "
                                            "judges it)")
    return cfg


def _recipe_for_sizes(cfg: RunConfig, dist):
    """(recipe, why, the probe). The fast recipe trains in one process on the CPU (its images in
    memory, or read from the decoded-image cache batch by batch where they do not fit); where a
    GPU or several processes are there to be used, fine-tuning the pretrained network (which uses
    them) is the better default, and the reason says so."""
    from ...config import DEFAULT_MODEL
    from ...data.probe import probe_image_sizes
    from ..distributed import choose_device
    probe = probe_image_sizes(cfg.data.path)
    side = probe.median_side
    transfer = f"transfer learning from {DEFAULT_MODEL}"
    if side is None:  # nothing readable: the scan or decoding says why
        return "transfer", "", probe
    seen = f"images are {side} px (median side of {probe.sampled} sampled)"
    if side > SMALL_IMAGE_SIDE:
        if 0 < probe.largest_class <= FEW_SHOT_IMAGES:
            return "fewshot", (f"{seen}, at most {probe.largest_class} training images per class: few-shot "
                               f"classifier on {DEFAULT_MODEL} embeddings"), probe
        return "transfer", f"{seen}: {transfer}", probe
    if dist is not None and dist.enabled:
        why = f"{seen}, but under {dist.world} processes (the fast recipe trains in one): {transfer}"
        return "transfer", why, probe
    device = choose_device(cfg.train.device, dist)
    if device.type != "cpu":
        return "transfer", f"{seen}, but on {device.type} (the fast recipe runs on the CPU only): {transfer}", probe
    return "fast", f"{seen}: fast from-scratch recipe (airbench)", probe
