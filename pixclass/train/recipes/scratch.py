"""From scratch on decoded images: the step loop with augmentation, validation, checkpoints,
early stopping and resume (the classic CNN's and any timm architecture's recipe)."""

from __future__ import annotations

import dataclasses
from functools import partial

from ...data.transforms import build_augment
from ...errors import UserError
from ..adversarial import FastAdversary
from ..hooks import Checkpoints, HistoryFile
from ..loop import ImageInputs, Trainer
from . import FitResult, Job, Recipe, SweepTarget
from .held_out import adversarial_held_out, held_out_and_scores, held_out_on_images

EPOCHS = 10


class ScratchRecipe(Recipe):
    name = "scratch"
    description = "from scratch on images"
    resumable = True
    adversarial = True
    multilabel = True

    def fit(self, job: Job) -> FitResult:
        cfg = job.cfg
        if cfg.train.epochs == 0:
            raise UserError("epochs must be >= 1 when training from scratch")
        train_cfg = dataclasses.replace(cfg.train, epochs=cfg.train.epochs or EPOCHS)
        hooks = [Checkpoints(job.run_dir, extra=job.checkpoint_extra), HistoryFile(job.run_dir)] if job.run_dir else []
        hooks += job.hooks
        adversary = None
        if cfg.train.adversarial:
            adversary = partial(FastAdversary, pre=job.data.preprocess, eps=cfg.train.adversarial_eps / 255)
        trainer = Trainer(job.model, job.data.train, job.data.val, train_cfg,
                          ImageInputs(job.data.preprocess, build_augment(cfg.augment)), job.reporter, hooks=hooks,
                          dist=job.dist, device=job.device, adversary=adversary,
                          balance=job.balance)
        if job.resume_from is not None:
            trainer.resume(job.resume_from)
        trainer.fit()
        trainer.restore_best()
        val_accuracy = trainer.validate()["val_accuracy"]  # of the model kept, which may be an earlier epoch's
        job.model.cpu().eval()  # evaluation, the artifact and the report work on the CPU copy
        held, scores = None, None
        if job.dist.main and job.data.multilabel:
            held = held_out_on_images(job.model, job.data)
        elif job.dist.main:  # calibration reuses the pass over the held-out images
            held, scores = held_out_and_scores(job.model, job.data, "none", cfg.data.max_memory_gb)
        metrics = {}
        if cfg.train.adversarial and held is not None:
            metrics["adversarial"] = adversarial_held_out(job.model, job.data, cfg.train.adversarial_eps, job.reporter)
        return FitResult(trainer.history, held, skipped=list(job.data.skipped), metrics=metrics,
                         val_accuracy=val_accuracy, cached_scores=scores)

    def sweep_target(self, job: Job) -> SweepTarget:
        return SweepTarget(job.model, job.data.train, ImageInputs(job.data.preprocess, build_augment(job.cfg.augment)))


RECIPE = ScratchRecipe()
