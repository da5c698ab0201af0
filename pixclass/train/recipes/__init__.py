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

from ...config import RunConfig
from ...errors import UserError

RECIPE_MODULES = {"scratch": "scratch", "transfer": "transfer", "fast": "fast"}


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

    def model_name(self, cfg: RunConfig) -> str:
        """The network to train when the user named this recipe: `cfg.model.name`, with "auto"
        standing for the recipe's own choice."""
        from ...config import DEFAULT_MODEL
        return DEFAULT_MODEL if cfg.model.name == "auto" else cfg.model.name

    def check(self, cfg: RunConfig, family) -> None:
        """Raise a UserError when this recipe cannot train `cfg.model.name`."""

    def start_early(self, cfg: RunConfig, family, scanned, dist):
        """Work to begin before the model is built (the model's import can take seconds); its
        handle reaches `fit` as `job.early`."""
        return None

    def fit(self, job: Job) -> FitResult:
        raise NotImplementedError


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


def choose_recipe(cfg: RunConfig):
    """(cfg with the model and recipe resolved, the model's family, the recipe). Without a recipe
    named, the model's family picks it; "auto" as model is DEFAULT_MODEL. The resolved names go
    into config.yaml, so `--config` reruns the same recipe."""
    from ...config import DEFAULT_MODEL
    from ...models.registry import family_for
    if cfg.train.recipe in ("auto", "standard"):  # "standard": the name configs of pixclass 0.1 used
        name = DEFAULT_MODEL if cfg.model.name == "auto" else cfg.model.name
        family = family_for(name, cfg.model)
        recipe = get_recipe(family.default_recipe(name, cfg.model))
    else:
        recipe = get_recipe(cfg.train.recipe)
        name = recipe.model_name(cfg)
        family = family_for(name, cfg.model)
    cfg = cfg.replace("model", name=family.canonical(name)).replace("train", recipe=recipe.name)
    recipe.check(cfg, family)
    return cfg, family, recipe
