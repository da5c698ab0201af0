"""One training run from a config, the same for every recipe: choose the recipe, scan and split
the data, build the model, let the recipe fit it, then (on rank 0) save the artifact, evaluate the
held-out split and write the report. Everything goes to a run folder (config, split manifest,
metrics, curves, checkpoints, model, evaluation, report)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import artifact as artifact_io
from ..config import RunConfig
from ..data.audit import quick_audit
from ..data.dataset import PreparedData, prepare_data, report_skipped
from ..data.decode import set_max_pixels
from ..data.scan import scan_dataset
from ..data.transforms import Preprocess
from ..errors import UserError
from ..evaluate import write_evaluation
from ..metrics import classification_metrics
from ..models.registry import create_model
from ..plot_worker import plotter_for_run
from ..progress import Reporter
from ..report import write_report
from ..runs import new_run_dir
from . import distributed
from .checkpoint import load_checkpoint
from .recipes import FitResult, Job, choose_recipe


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_training(cfg: RunConfig, out: Path | None = None, resume: Path | None = None,
                 reporter: Reporter | None = None) -> dict:
    """Train as `cfg` says; returns the run's summary (on ranks other than 0: {"rank": N})."""
    dist = distributed.from_env()
    cfg, family, recipe = choose_recipe(cfg)
    reporter = reporter or Reporter()
    if dist.enabled and not recipe.distributed:
        if not dist.main:  # before any work or process group: rank 0 trains alone
            return {"rank": dist.rank, "epochs_run": 0}
        reporter.warn(f"the {recipe.name} recipe trains in one process; the other {dist.world - 1} stay idle")
        dist = distributed.Dist()
    if resume is not None and not recipe.resumable:
        raise UserError(f"--resume is not available for the {recipe.name} recipe ({recipe.restart_note})")
    # the report's figures are drawn by a worker process that imports matplotlib now, while this
    # process imports the model's libraries and trains (see plot_worker)
    plotter = plotter_for_run(enabled=dist.main)
    try:
        return _run(cfg, family, recipe, out, resume, reporter if dist.main else Reporter(quiet=True), dist, plotter)
    finally:
        plotter.close()


def _run(cfg: RunConfig, family, recipe, out, resume, reporter: Reporter, dist, plotter) -> dict:
    device = distributed.choose_device(cfg.train.device, dist)
    if recipe.cpu_only:
        device = torch.device("cpu")
    distributed.init(dist, device)
    started = time.perf_counter()
    set_max_pixels(cfg.data.max_pixels)
    preprocess, resume_from = None, None
    if resume is not None:
        resume_from, state, run_dir = _resume_state(resume)
        preprocess = Preprocess.from_dict(state["extra"]["preprocess"])
    else:
        run_dir = Path(out) if out else new_run_dir(Path(cfg.data.path).resolve().name)
    manifest = cfg.data.manifest or (run_dir / "manifest.csv" if (run_dir / "manifest.csv").is_file() else None)
    scanned = scan_dataset(cfg.data.path, cfg.data.split, cfg.train.seed, manifest)
    findings = quick_audit(scanned)
    if findings:
        reporter.warn("dataset check:\n  " + "\n  ".join(findings) + f"\n  (details: pixclass audit {cfg.data.path})")
    torch.manual_seed(cfg.train.seed)
    early = recipe.start_early(cfg, family, scanned, dist)
    model = arch = None
    if family.weights_decide_preprocessing:  # the model first: its pretrained config decides the preprocessing
        model, arch = create_model(cfg.model.name, len(scanned.classes), cfg.data.channels, cfg.data.image_size or 224,
                                   cfg.model, reporter)
        preprocess = family.preprocess(model, cfg.data.channels, cfg.data.image_size)
    data = prepare_data(cfg.data.path, cfg.data.channels, cfg.data.image_size, cfg.data.split, cfg.train.seed,
                        manifest, preprocess, cfg.data.max_memory_gb, reporter, decode=recipe.decodes_images,
                        scanned=scanned)
    cfg = cfg.replace("data", image_size=data.preprocess.size)
    if model is None:
        model, arch = create_model(cfg.model.name, len(data.classes), data.preprocess.channels, data.preprocess.size,
                                   cfg.model, reporter)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.write_manifest(run_dir / "manifest.csv")
        cfg.save_yaml(run_dir / "config.yaml")
    _report_setup(data, model, arch, recipe, device, dist, reporter)
    job = Job(model, arch, data, cfg, run_dir if dist.main else None, reporter, dist, device, resume_from, early)
    result = recipe.fit(job)
    if not dist.main:  # rank 0 evaluates and writes the run folder
        distributed.shutdown(dist)
        return {"rank": dist.rank, "epochs_run": len(result.history)}
    summary = _finish(job, result, run_dir, plotter, started)
    distributed.shutdown(dist)
    return summary


def _finish(job: Job, result: FitResult, run_dir: Path, plotter, started: float) -> dict:
    """The artifact, the evaluation of the held-out split and the report: the same for every recipe."""
    data, cfg = job.data, job.cfg
    already_named = set(data.skipped)  # by prepare_data
    report_skipped([s for s in result.skipped if s not in already_named], job.reporter)
    metrics = {}
    if result.held_out is not None:
        held = result.held_out
        metrics = dict(classification_metrics(held.labels, held.probabilities, data.classes), split=held.split,
                       **result.metrics)
    art = artifact_io.Artifact(model=job.model, arch=job.arch, classes=data.classes, preprocess=data.preprocess,
                               config=cfg.to_dict())
    art.metrics = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
    art.metrics["history_last"] = result.history[-1] if result.history else {}
    model_dir = artifact_io.save(art, run_dir / "model")  # before the report: nothing it does can cost the model
    report = None
    if metrics:
        held = result.held_out
        write_evaluation(metrics, data.classes, run_dir / "evaluation")
        report = write_report(run_dir, art, metrics, held.probabilities, held.labels, held.paths,
                              history=result.history, counts=data.counts(),
                              run_info={"data": cfg.data.path, "run folder": str(run_dir), "recipe": cfg.train.recipe,
                                        "epochs run": len(result.history),
                                        "seconds": round(time.perf_counter() - started, 1)},
                              plotter=plotter)
    elif result.history:  # no held-out split, so no report: the curves on their own
        from ..plots import training_curves
        plotter.submit(training_curves, result.history, run_dir / "curves.png").get()
    return {"run_dir": str(run_dir), "model_dir": str(model_dir), "classes": data.classes,
            "recipe": cfg.train.recipe, "epochs_run": len(result.history), "history": result.history,
            "train_seconds": round(time.perf_counter() - started, 1), "timings": result.timings,
            "metrics": {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")},
            "skipped_files": [str(p) for p, _ in result.skipped], "report": str(report) if report else None}


def _resume_state(resume: Path):
    resume = Path(resume)
    ckpt_path = resume if resume.is_file() else resume / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path)
    return ckpt_path, state, ckpt_path.parent.parent


def _report_setup(data: PreparedData, model, arch: dict, recipe, device, dist, reporter: Reporter) -> None:
    counts = data.counts()
    totals = {s: sum(c[s] for c in counts.values()) for s in ("train", "val", "test")}
    reporter.info(f"data: {len(data.classes)} classes, train {totals['train']}, val {totals['val']}, "
                  f"test {totals['test']} images ({data.scanned.layout}); size {data.preprocess.size}px, "
                  f"mean {[round(m, 3) for m in data.preprocess.mean]} "
                  f"std {[round(s, 3) for s in data.preprocess.std]}")
    total, _ = count_parameters(model)
    pre = data.preprocess
    reporter.info(f"model {arch['name']}: {total:,} parameters, input {pre.channels}x{pre.size}x{pre.size}; "
                  f"recipe {recipe.name} ({recipe.description}), on {device}"
                  + (f", {dist.world} processes" if dist.enabled else ""))


def check_resumable(run_dir: Path) -> None:
    if not (Path(run_dir) / "checkpoints" / "last.pt").is_file():
        raise UserError(f"nothing to resume in {run_dir} (no checkpoints/last.pt)")
