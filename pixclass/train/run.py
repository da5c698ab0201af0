"""One training run from a config: data -> model -> trainer -> artifact -> evaluation, with
everything written to a run folder (config, split manifest, metrics, curves, checkpoints, model,
evaluation)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import artifact as artifact_io
from ..config import DEFAULT_MODEL, RunConfig
from ..data.dataset import PreparedData, report_skipped, prepare_data
from ..data.audit import quick_audit
from ..data.decode import set_max_pixels
from ..data.scan import scan_dataset
from ..data.transforms import Preprocess, build_augment
from ..errors import UserError
from ..evaluate import evaluate_split, write_evaluation
from ..report import write_report
from ..metrics import classification_metrics
from ..plot_worker import plotter_for_run
from ..data.loaders import DecodeAhead, SplitData, default_workers
from ..models.factory import FAST_NAME, FAST_WIDTHS, create_model, uses_pretrained
from ..models.pretrained import known_preprocess, pretrained_preprocess
from ..progress import Reporter
from ..runs import new_run_dir
from . import distributed
from .checkpoint import load_checkpoint
from .loop import ImageInputs, Trainer
from .transfer import fit_transfer

SCRATCH_EPOCHS = 10


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _resume_state(resume: Path):
    resume = Path(resume)
    ckpt_path = resume if resume.is_file() else resume / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path)
    return ckpt_path, state, ckpt_path.parent.parent


def run_training(cfg: RunConfig, out: Path | None = None, resume: Path | None = None,
                 reporter: Reporter | None = None, plotter=None) -> dict:
    """`plotter`: where the report's figures are drawn (see plot_worker); the command line starts
    one before it imports torch, so that its matplotlib import overlaps with ours."""
    dist = distributed.from_env()
    own = plotter is None  # a plotter given by the caller is the caller's to close
    plotter = plotter or plotter_for_run(enabled=dist.main)
    try:
        return _run_training(cfg, out, resume, reporter, dist, plotter)
    finally:
        if own:
            plotter.close()


def _run_training(cfg: RunConfig, out: Path | None, resume: Path | None, reporter: Reporter | None, dist,
                  plotter) -> dict:
    device = distributed.choose_device(cfg.train.device, dist)
    distributed.init(dist, device)
    reporter = reporter or Reporter()
    if not dist.main:
        reporter = Reporter(quiet=True)  # one rank reports; the others train quietly
    started = time.perf_counter()
    set_max_pixels(cfg.data.max_pixels)
    preprocess, ckpt_path = None, None
    if resume is not None:
        ckpt_path, state, run_dir = _resume_state(resume)
        preprocess = Preprocess.from_dict(state["extra"]["preprocess"])
    else:
        run_dir = Path(out) if out else new_run_dir(Path(cfg.data.path).resolve().name)
    manifest = cfg.data.manifest or (run_dir / "manifest.csv" if (run_dir / "manifest.csv").is_file() else None)
    scanned = scan_dataset(cfg.data.path, cfg.data.split, cfg.train.seed, manifest)
    findings = quick_audit(scanned)
    if findings:
        reporter.warn("dataset check:\n  " + "\n  ".join(findings) + f"\n  (details: pixclass audit {cfg.data.path})")
    fast = cfg.train.recipe == "fast"
    if cfg.model.name == "auto":
        cfg = cfg.replace("model", name=FAST_NAME if fast else DEFAULT_MODEL)
    if fast:
        if cfg.model.name not in ("seed-cnn", *FAST_WIDTHS):
            raise UserError(f"--recipe fast trains its own network ({' or '.join(FAST_WIDTHS)}); "
                            f"drop --model {cfg.model.name}")
        if resume is not None:
            raise UserError("--resume is not available for --recipe fast")
        if cfg.model.name == "seed-cnn":
            cfg = cfg.replace("model", name=FAST_NAME)
    transfer = uses_pretrained(cfg.model.name, cfg.model)
    if transfer and resume is not None:
        raise UserError("--resume is for from-scratch runs; a pretrained run restarts in seconds from its feature cache")
    model = arch = None
    torch.manual_seed(cfg.train.seed)
    decoding = None
    if transfer:  # the model comes first: its pretrained config decides the preprocessing
        early = known_preprocess(cfg.model.name, cfg.data.channels, cfg.data.image_size)
        if early is not None and not dist.enabled:  # decode while timm imports and the model is built, on the cores that
            # import leaves idle (one worker fewer than cores measured ~0.4 s faster than as many)
            # in split order, as the features are consumed: each batch's memory is freed as soon
            # as its rows are copied into their split (see features._splits)
            in_order = [s.path for split in ("train", "val", "test") for s in scanned.samples if s.split == split]
            decoding = DecodeAhead(list(dict.fromkeys(in_order)), early, workers=max(1, default_workers() - 1))
        model, arch = create_model(cfg.model.name, len(scanned.classes), cfg.data.channels, cfg.data.image_size or 224,
                                   cfg.model, reporter)
        preprocess = pretrained_preprocess(model.backbone, cfg.data.channels, cfg.data.image_size)
    data = prepare_data(cfg.data.path, cfg.data.channels, cfg.data.image_size, cfg.data.split, cfg.train.seed,
                        manifest, preprocess, cfg.data.max_memory_gb, reporter, decode=not transfer, scanned=scanned)
    cfg = cfg.replace("data", image_size=data.preprocess.size)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.write_manifest(run_dir / "manifest.csv")
        cfg.save_yaml(run_dir / "config.yaml")
    _report_data(data, reporter)
    if fast and not isinstance(data.train, SplitData):
        raise UserError("--recipe fast keeps the training images in memory; raise data.max_memory_gb or use smaller images")
    if model is None:
        model, arch = create_model(cfg.model.name, len(data.classes), data.preprocess.channels, data.preprocess.size,
                                   cfg.model, reporter)
    total, trainable = count_parameters(model)
    reporter.info(f"model {arch['name']}: {total:,} parameters, input "
                  f"{data.preprocess.channels}x{data.preprocess.size}x{data.preprocess.size}, "
                  f"on {'cpu (the fast recipe is for CPUs)' if fast else device}"
                  + (f", {dist.world} processes" if dist.enabled else ""))
    extra = {"preprocess": data.preprocess.to_dict(), "arch": arch, "classes": data.classes}
    art = artifact_io.Artifact(model=model, arch=arch, classes=data.classes, preprocess=data.preprocess,
                               config=cfg.to_dict())
    if fast:
        from .fast import fit_fast, hyper_for
        hyp = hyper_for(cfg.model.name)
        result = fit_fast(model, data, cfg.train.epochs or hyp.epochs, cfg.train.seed, cfg.train.precision, run_dir,
                          reporter, hyp)
        history, skipped = result["history"], data.skipped
        timings = {"train_s": result["train_s"], "tta_s": result.get("tta_s")}
        metrics, held = {}, None
        if result["held_out"] is not None:
            probs, labels = result["held_out"]
            metrics = dict(classification_metrics(labels, probs, data.classes), split=result["held_out_split"],
                           tta=True, accuracy_without_tta=result["accuracy_without_tta"])
            held = (probs, labels, getattr(data, result["held_out_split"]).paths)
    elif transfer:
        result = fit_transfer(model, data, cfg, run_dir, reporter, extra, decoding, dist, device)
        if not dist.main:
            distributed.shutdown(dist)
            return {"rank": dist.rank, "epochs_run": len(result.history)}
        history, skipped, timings = result.history, result.skipped, result.timings
        report_skipped(skipped, reporter)
        metrics, held = {}, None
        if result.held_out is not None:
            probs, labels = result.held_out
            metrics = dict(classification_metrics(labels, probs, data.classes), split=result.held_out_split)
            held = (probs, labels, result.held_out_paths)
    else:
        history = _fit_scratch(model, data, cfg, run_dir, reporter, extra, ckpt_path, dist, device)
        skipped, timings = data.skipped, {}
        if not dist.main:  # rank 0 evaluates and writes the run folder
            distributed.shutdown(dist)
            return {"rank": dist.rank, "epochs_run": len(history)}
        metrics, held = _evaluate_held_out(art, data)
    art.metrics = {k: metrics[k] for k in metrics if k not in ("per_class", "confusion_matrix")}
    art.metrics["history_last"] = history[-1] if history else {}
    model_dir = artifact_io.save(art, run_dir / "model")  # before the report: nothing it does can cost the model
    report = None
    if metrics:
        write_evaluation(metrics, data.classes, run_dir / "evaluation")
        report = write_report(run_dir, art, metrics, *held, history=history, counts=data.counts(),
                              title=f"pixclass run {run_dir.name}",
                              run_info={"data": cfg.data.path, "run folder": str(run_dir),
                                        "epochs run": len(history), "seconds": round(time.perf_counter() - started, 1)},
                              plotter=plotter)
    elif history:  # no held-out split, so no report: the curves on their own
        from ..plots import training_curves
        plotter.submit(training_curves, history, run_dir / "curves.png").get()
    distributed.shutdown(dist)
    return {"run_dir": str(run_dir), "model_dir": str(model_dir), "classes": data.classes,
            "epochs_run": len(history), "train_seconds": round(time.perf_counter() - started, 1),
            "timings": timings, "metrics": {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")},
            "skipped_files": [str(p) for p, _ in skipped], "report": str(report) if report else None}


def _fit_scratch(model, data: PreparedData, cfg: RunConfig, run_dir: Path, reporter: Reporter, extra: dict,
                 ckpt_path: Path | None, dist=None, device: torch.device | None = None) -> list[dict]:
    if cfg.train.epochs == 0:
        raise UserError("epochs must be >= 1 when training from scratch")
    train_cfg = dataclasses.replace(cfg.train, epochs=cfg.train.epochs or SCRATCH_EPOCHS)
    main = dist is None or dist.main
    trainer = Trainer(model, data.train, data.val, train_cfg, ImageInputs(data.preprocess, build_augment(cfg.augment)),
                      run_dir if main else None, reporter, extra=extra, dist=dist, device=device,
                      final_curves=False)  # run_training draws them, in the report or alone
    if ckpt_path is not None:
        trainer.resume(ckpt_path)
    trainer.fit()
    trainer.restore_best()
    model.cpu().eval()  # evaluation, the artifact and the report work on the CPU copy
    return trainer.history


def _evaluate_held_out(art, data: PreparedData):
    """(metrics, (probabilities, labels, paths)) on test, or val when there is no test split."""
    held_out, split_name = (data.test, "test") if data.test is not None and len(data.test) else (data.val, "val")
    if held_out is None or not len(held_out):
        return {}, None
    metrics, probs = evaluate_split(art, held_out)
    metrics["split"] = split_name
    paths = getattr(held_out, "paths", [])
    return metrics, (probs, held_out.labels.numpy(), paths)


def _report_data(data: PreparedData, reporter: Reporter) -> None:
    counts = data.counts()
    totals = {s: sum(c[s] for c in counts.values()) for s in ("train", "val", "test")}
    reporter.info(f"data: {len(data.classes)} classes, train {totals['train']}, val {totals['val']}, "
                  f"test {totals['test']} images ({data.scanned.layout}); size {data.preprocess.size}px, "
                  f"mean {[round(m, 3) for m in data.preprocess.mean]} std {[round(s, 3) for s in data.preprocess.std]}")


def check_resumable(run_dir: Path) -> None:
    if not (Path(run_dir) / "checkpoints" / "last.pt").is_file():
        raise UserError(f"nothing to resume in {run_dir} (no checkpoints/last.pt)")
