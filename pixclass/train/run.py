"""One training run from a config, the same for every recipe: choose the recipe, scan and split
the data, build the model, let the recipe fit it, then (on rank 0) save the artifact, evaluate the
held-out split and write the report. Everything goes to a run folder (config, split manifest,
metrics, curves, checkpoints, model, evaluation, report)."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .. import artifact as artifact_io
from ..config import RunConfig
from ..data.audit import quick_audit
from ..data.dataset import PreparedData, prepare_data, report_skipped
from ..data.decode import set_max_pixels
from ..data.scan import dataset_name, scan_dataset
from ..data.transforms import Preprocess
from ..atomic_write import FileWriteError, describe_os_error
from ..errors import UserError, first_line
from ..evaluate import write_evaluation
from ..metrics import absent_classes_note, likely_label_issues, metrics_for
from ..models.registry import create_model
from ..plot_worker import plotter_for_run
from ..progress import Reporter
from ..report import write_report
from ..runs import CLAIM_FILE, ClaimedFolder, claim_folder, claim_new_folder
from . import distributed
from .balance import OFF, resolve_balance
from .budget import Budget
from .calibrate import calibrate
from .checkpoint import load_checkpoint
from .recipes import FitResult, Job, choose_recipe, validation_accuracy
from .tracking import Tracking, check_installed

FAILED_FILE = "failed.txt"  # in the folder of a run that stopped before it finished: why, and what next
RUN_LOG = "train.log"  # every message the run printed, timestamped (progress bars aside)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_training(cfg: RunConfig, out: Path | None = None, resume: Path | None = None,
                 reporter: Reporter | None = None) -> dict:
    """Train as `cfg` says; returns the run's summary (on ranks other than 0: {"rank": N})."""
    dist = distributed.from_env()
    reporter = reporter or Reporter()
    check_installed(cfg)
    chosen_here = not cfg.train.recipe_reason  # a reason already there came with a --config or --resume
    model_chosen = cfg.model.name == "auto"  # not named: the recipe's plan may choose the network
    cfg, family, recipe = choose_recipe(cfg, dist)
    if chosen_here and cfg.train.recipe_reason and dist.main:
        reporter.info(cfg.train.recipe_reason)
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
        return _run(cfg, family, recipe, out, resume, reporter if dist.main else Reporter(quiet=True), dist, plotter,
                    model_chosen)
    finally:
        plotter.close()


def _budget_and_device(cfg: RunConfig, recipe, dist, started: float | None = None):
    """(the time budget, the device) a run plans with, and the decoder's pixel limit set: what a
    saved run and an in-process one (tune, lr-find) both settle before _prepare."""
    minutes = cfg.train.budget or recipe.default_budget_minutes
    device = distributed.choose_device(cfg.train.device, dist)
    if recipe.cpu_only:
        device = torch.device("cpu")
    set_max_pixels(cfg.data.max_pixels)
    return (Budget(minutes, started) if minutes else None), device


def _run(cfg: RunConfig, family, recipe, out, resume, reporter: Reporter, dist, plotter, model_chosen=False) -> dict:
    started = time.perf_counter()
    budget, device = _budget_and_device(cfg, recipe, dist, started)
    distributed.init(dist, device)
    resumed = _resume_state(resume) if resume is not None else None
    # a new run's folder is claimed before any data is read: a bad --out fails at once, and no
    # run started meanwhile can choose the same folder (only rank 0 writes one)
    folder = _claim_run_folder(cfg, out) if resumed is None and dist.main else None
    run_dir = resumed.run_dir if resumed is not None else folder.path if folder is not None else None
    if folder is not None:
        reporter.keep_log(run_dir / RUN_LOG)
    job, tracking = None, Tracking()
    try:
        job = _prepare(cfg, family, recipe, run_dir, resumed, reporter, dist, device, budget,
                       model_chosen and resumed is None)
        if resumed is not None and dist.main:  # only once the resume is accepted: a refused one changes nothing
            reporter.keep_log(run_dir / RUN_LOG)
        if job.cfg.train.lr == "auto":
            _find_lr_for_run(job, recipe, plotter)
        if dist.main and cfg.train.track:  # once the config is resolved: it is what the trackers record
            tracking = Tracking(job.cfg, run_dir, reporter, resumed=resumed is not None)
            job.hooks.append(tracking)
        result = recipe.fit(job)
        if not dist.main:  # rank 0 evaluates and writes the run folder
            distributed.shutdown(dist)
            return {"rank": dist.rank, "epochs_run": len(result.history)}
        summary = _finish(job, result, run_dir, plotter, started)
        tracking.finish(job.cfg, summary, run_dir)
    except (Exception, KeyboardInterrupt) as e:
        tracking.close(failed=True)
        reporter.log(f"stopped: {first_line(e) or type(e).__name__}")
        reporter.close_log()
        if folder is not None and not _trained_anything(run_dir):  # the same --out works next time
            folder.release(written=("manifest.csv", RUN_LOG))
            raise
        if not dist.main or job is None:  # a failed resume wrote nothing: the run is as it was
            raise
        stopped = _record_stop(e, run_dir, recipe)
        if stopped is None:
            raise
        raise stopped from None
    tracking.close(failed=False)
    reporter.log(_finished_line(summary, time.perf_counter() - started))
    reporter.close_log()
    distributed.shutdown(dist)
    return summary


def _finished_line(summary: dict, seconds: float) -> str:
    """The log's last line: what the terminal's closing lines say (the held-out figure, the model),
    with the whole run's time."""
    m = summary["metrics"]
    figure = ""
    if m.get("task") == "multilabel":
        figure = f"{m['split']} macro F1 {m['macro_f1']:.4f} ({m['n']} images); "
    elif "accuracy" in m:
        figure = f"{m['split']} accuracy {m['accuracy']:.4f} ({m['n']} images); "
    return f"finished in {seconds:.1f}s: {figure}model {summary['model_dir']}"


def _find_lr_for_run(job: Job, recipe, plotter) -> None:
    """`--lr auto`: the learning-rate range test on the prepared job, its suggestion taken as the
    run's rate and recorded in config.yaml (`--config` reruns it without the test), its curve
    drawn as lr_find.png. Under torchrun every rank runs the same test on the same data."""
    from ..plots import lr_find_curve
    from .lr_find import range_test
    finding = range_test(recipe.sweep_target(job), job.cfg.train, job.device)
    job.reporter.info(f"lr-find: {finding.describe()}")
    job.record(job.cfg.replace("train", lr=finding.suggestion))
    if job.run_dir is not None:
        plotter.submit(lr_find_curve, finding.lrs, finding.losses,
                       {"steepest": finding.steepest, "minimum/10": finding.minimum}, job.run_dir / "lr_find.png")


def prepare_in_process(cfg: RunConfig, reporter: Reporter):
    """(recipe, Job) prepared as a run prepares them (the same recipe choice, plan, data and
    model), in this process, with no run folder: for what trains or sweeps without saving a
    run (`pixclass tune`'s trials, `pixclass lr-find`)."""
    dist = distributed.Dist()
    model_chosen = cfg.model.name == "auto"
    cfg, family, recipe = choose_recipe(cfg, dist)
    budget, device = _budget_and_device(cfg, recipe, dist)
    job = _prepare(cfg, family, recipe, None, None, reporter, dist, device, budget, model_chosen)
    return recipe, job


def fit_in_process(cfg: RunConfig, reporter: Reporter, hooks=()) -> tuple[RunConfig, FitResult]:
    """Train as `run_training` trains, without the run folder, the artifact or the report: (the
    config as the recipe planned it, what it fitted). `hooks` see every phase's epochs."""
    recipe, job = prepare_in_process(cfg, reporter)
    job.hooks = list(hooks)
    if job.cfg.train.lr == "auto":
        raise UserError("a trial needs a number as its learning rate, not auto")
    return job.cfg, recipe.fit(job)


def find_lr_in_process(cfg: RunConfig, reporter: Reporter, steps: int | None = None, method: str = "lower"):
    """`pixclass lr-find`: (the config as the run would plan it, the range test's LRFinding) for
    what the run's recipe trains first, prepared as the run prepares it."""
    from .lr_find import STEPS, range_test
    recipe, job = prepare_in_process(cfg, reporter)
    return job.cfg, range_test(recipe.sweep_target(job), job.cfg.train, job.device, steps=steps or STEPS,
                               method=method)


def _claim_run_folder(cfg: RunConfig, out) -> ClaimedFolder:
    """The new run's folder, claimed (see runs.py) and holding its config.yaml."""
    if out:
        folder = claim_folder(Path(out), CLAIM_FILE)
    else:
        folder = claim_new_folder(dataset_name(cfg.data.path), claim=CLAIM_FILE)
    try:
        _write_run_files(folder.path, cfg)
    except UserError:
        folder.release()
        raise
    return folder


def _prepare(cfg: RunConfig, family, recipe, run_dir: Path | None, resumed, reporter: Reporter, dist, device,
             budget: Budget | None = None, model_chosen: bool = False) -> Job:
    """Scan, split and decode the data and build the model; a resumed run is checked against its
    checkpoint first. The run folder's config.yaml and manifest.csv are written only after that."""
    preprocess = Preprocess.from_dict(resumed.state["extra"]["preprocess"]) if resumed is not None else None
    manifest = cfg.data.manifest
    if manifest is None and resumed is not None and (resumed.run_dir / "manifest.csv").is_file():
        manifest = resumed.run_dir / "manifest.csv"
    scanned = scan_dataset(cfg.data.path, cfg.data.split, cfg.train.seed, manifest)
    if resumed is not None:
        _check_resumed_classes(resumed, scanned.classes, cfg.data.path)
    findings = quick_audit(scanned)
    if findings:
        reporter.warn("dataset check:\n  " + "\n  ".join(findings) + f"\n  (details: pixclass audit {cfg.data.path})")
    planned = cfg.train.plan
    if resumed is None and not dist.enabled:  # ranks would each measure their own plan: the defaults
        cfg = recipe.plan(cfg, scanned, budget, model_chosen, reporter)
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
    if resumed is not None:
        _check_resumed_model(resumed, model, arch)
    if cfg.train.plan != planned:  # said once the model is built: a model that cannot be is the one line
        reporter.info(f"plan: {cfg.train.plan}")
    if dist.main and run_dir is not None:
        _write_run_files(run_dir, cfg, data)
    _report_setup(data, model, arch, recipe, device, dist, reporter)
    no_choice = recipe.no_checkpoint_choice or ("" if data.val is not None and len(data.val) else "no validation split")
    if data.multilabel:  # class weights and draws are per single label; a multi-label image has several
        balance = OFF
    else:
        balance = resolve_balance(cfg.train.balance, data.train.labels, data.classes, no_checkpoint_choice=no_choice)
    if balance.description:
        reporter.info(f"class balance: {balance.description}")
    return Job(model, arch, data, cfg, run_dir if dist.main else None, reporter, dist, device,
               resumed.checkpoint if resumed is not None else None, early, budget, balance=balance)


def _write_run_files(run_dir: Path, cfg: RunConfig, data: PreparedData | None = None) -> None:
    """config.yaml and (once the data is split) manifest.csv, each replaced whole."""
    tmp = run_dir / "manifest.csv.tmp"
    try:
        if data is not None:
            data.write_manifest(tmp)
            os.replace(tmp, run_dir / "manifest.csv")
        cfg.save_yaml(run_dir / CLAIM_FILE)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write in the run folder {run_dir}: {describe_os_error(e)}") from None


def _trained_anything(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").exists() or (run_dir / "metrics.csv").exists()


def _record_stop(error: BaseException, run_dir: Path, recipe) -> UserError | None:
    """A run that stopped after it began training keeps its folder (config.yaml describes the run
    its checkpoints belong to, which is what --resume continues) and says so in failed.txt.
    Returns the error to raise in place of `error` (one line, with how to continue), or None."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        error = FileWriteError(f"{describe_os_error(error)} while writing the run folder {run_dir}")
    message = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else first_line(error)
    if recipe.resumable and (run_dir / "checkpoints" / "last.pt").is_file():
        how = f"continue it with: pixclass train --resume {run_dir}"
    else:
        how = "start it again with another --out"
    try:  # best effort: on a full disk even this may not fit, and the folder already tells (no model/)
        (run_dir / FAILED_FILE).write_text(f"this run stopped before it finished: {message}\n{how}\n")
    except OSError:
        pass
    if isinstance(error, FileWriteError):
        return FileWriteError(f"{message}; {how}")
    return None


def _finish(job: Job, result: FitResult, run_dir: Path, plotter, started: float) -> dict:
    """The artifact, the evaluation of the held-out split and the report: the same for every recipe."""
    data, cfg = job.data, job.cfg
    already_named = set(data.skipped)  # by prepare_data
    report_skipped([s for s in result.skipped if s not in already_named], job.reporter)
    thresholds, calibrated = None, None
    if data.multilabel:
        from .thresholds import fit_thresholds
        thresholds = fit_thresholds(job.model, data, result.tta, job.reporter)
    else:
        calibrated = calibrate(job.model, data, result.tta, result.held_out.split if result.held_out else None,
                               job.reporter, cfg.data.max_memory_gb, seed=cfg.train.seed, cached=result.cached_scores)
    held, uncalibrated = result.held_out, None
    if calibrated is not None and held is not None and calibrated.held_out is not None \
            and len(calibrated.held_out) == len(held.labels):
        # the run's figures are those of the calibrated model (what `pixclass evaluate` gives); the
        # report shows calibration before and after
        uncalibrated = held.probabilities
        held = dataclasses.replace(held, probabilities=calibrated.held_out)
    metrics = {}
    if held is not None:
        metrics = dict(metrics_for(held.labels, held.probabilities, data.classes, thresholds), split=held.split,
                       **result.metrics)
        if calibrated is not None:
            metrics["temperature"] = calibrated.temperature
            if calibrated.abstain is not None and len(held.probabilities) == len(held.labels):
                # the share the saved model answers unknown (its report says it; a knn_similarity
                # threshold needs the similarities, which the probabilities alone do not give)
                metrics["unknown_share"] = float(calibrated.abstain.unknown(
                    held.probabilities, calibrated.held_out_similarity).mean())
        # said again beside the final accuracy: a class with no held-out image is not in that number
        if (val_accuracy := validation_accuracy(result)) is not None:
            metrics["val_accuracy"] = val_accuracy  # what `pixclass tune` selected on
        note = absent_classes_note(metrics, f"the {held.split} split")
        if note:
            job.reporter.warn(note)
    art = artifact_io.Artifact(model=job.model, arch=job.arch, classes=data.classes, preprocess=data.preprocess,
                               config=cfg.to_dict(), tta=result.tta,
                               temperature=calibrated.temperature if calibrated else 1.0,
                               abstain=calibrated.abstain if calibrated else None, thresholds=thresholds,
                               feature_bank=calibrated.feature_bank if calibrated else None)
    # the recipe's own figures too where nothing was held out (the few-shot recipe's leave-one-out accuracy)
    art.metrics = {k: v for k, v in {**result.metrics, **metrics}.items() if k not in ("per_class", "confusion_matrix")}
    art.metrics["history_last"] = result.history[-1] if result.history else {}
    model_dir = artifact_io.save(art, run_dir / "model")  # before the report: nothing it does can cost the model
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a resumed run that has now finished
    report = None
    if metrics:
        write_evaluation(metrics, data.classes, run_dir / "evaluation")
        labels_note = "" if data.multilabel else label_issues_note(held, metrics["accuracy"], cfg.data.path)
        if labels_note:
            job.reporter.info(labels_note)
        report = write_report(run_dir, art, metrics, held.probabilities, held.labels, held.paths,
                              history=result.history, counts=data.counts(),
                              run_info=_run_info(job, result, run_dir, started, labels_note),
                              plotter=plotter, uncalibrated=uncalibrated)
    elif result.history:  # no held-out split, so no report: the curves on their own
        from ..plots import training_curves
        plotter.submit(training_curves, result.history, run_dir / "curves.png").get()
    return {"run_dir": str(run_dir), "model_dir": str(model_dir), "classes": data.classes,
            "recipe": cfg.train.recipe, "epochs_run": len(result.history), "history": result.history,
            "train_seconds": round(time.perf_counter() - started, 1), "timings": result.timings,
            "metrics": {k: v for k, v in art.metrics.items() if k != "history_last"},
            "skipped_files": [str(p) for p, _ in result.skipped], "report": str(report) if report else None}


def _run_info(job: Job, result: FitResult, run_dir: Path, started: float, labels_note: str = "") -> dict:
    """The report's summary of the run: what trained, the plan for the time budget (when there
    was one) and the time of each phase against it."""
    cfg = job.cfg
    info = {"data": cfg.data.path, "run folder": str(run_dir), "recipe": cfg.train.recipe,
            "epochs run": len(result.history), "seconds": round(time.perf_counter() - started, 1)}
    if job.budget is not None:
        info["time budget"] = f"{job.budget.minutes:g} min"
    if cfg.train.plan:
        info["plan"] = cfg.train.plan
    if job.balance is not None and job.balance.description:
        info["class balance"] = job.balance.description
    if labels_note:
        info["likely label issues"] = labels_note
    if result.timings:
        info["time per phase"] = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.timings.items())
    return info


# below this held-out accuracy the model's own errors drown out wrong labels: no count is given
LABEL_ISSUES_MIN_ACCURACY = 0.7


def label_issues_note(held, accuracy: float, data_path) -> str:
    """The report's count of suspect labels in the held-out split (from the predictions the run
    has anyway), with a pointer to the command that ranks the whole dataset's."""
    how = f"rank every image's label: pixclass audit {data_path} --labels"
    if accuracy < LABEL_ISSUES_MIN_ACCURACY:
        return (f"not counted on the {held.split} split: at accuracy {accuracy:.2f} this model's own errors hide "
                f"wrong labels; {how}")
    issues = int(likely_label_issues(held.labels, held.probabilities).sum())
    return (f"{issues} of the {len(held.labels)} {held.split} images may be mislabeled (confident learning on this "
            f"run's predictions); {how}")


class Resumed(NamedTuple):
    checkpoint: Path
    state: dict
    run_dir: Path


def _resume_state(resume: Path) -> Resumed:
    resume = Path(resume)
    ckpt_path = resume if resume.is_file() else resume / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path)
    return Resumed(ckpt_path, state, ckpt_path.parent.parent)


def _check_resumed_classes(resumed: Resumed, classes: list[str], data_path) -> None:
    """The data must have the classes the run was trained on, in the same order: a different
    count fails to load, and the same count with other names would label the model wrongly."""
    saved = list(resumed.state.get("extra", {}).get("classes") or classes)
    if saved != list(classes):
        raise UserError(f"cannot resume {resumed.run_dir} on {data_path}: the run was trained on the classes "
                        f"{_names(saved)}, the data has {_names(classes)}")


def _check_resumed_model(resumed: Resumed, model: torch.nn.Module, arch: dict) -> None:
    """The network built now must take the checkpoint's weights (same architecture, same shapes)."""
    saved_arch = resumed.state.get("extra", {}).get("arch") or {}
    saved = {k: tuple(v.shape) for k, v in resumed.state["model"].items()}
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved_arch.get("name", arch["name"]) != arch["name"] or saved != built:
        raise UserError(f"cannot resume {resumed.run_dir}: its checkpoint holds a {saved_arch.get('name', '?')} "
                        f"({len(saved)} tensors), the options given build a {arch['name']} ({len(built)} tensors"
                        f"{', other shapes' if len(saved) == len(built) else ''}); resume without changing the model")


def _names(classes: list[str], shown: int = 10) -> str:
    more = f", ... ({len(classes)} in all)" if len(classes) > shown else ""
    return "[" + ", ".join(classes[:shown]) + more + "]"


def _report_setup(data: PreparedData, model, arch: dict, recipe, device, dist, reporter: Reporter) -> None:
    # images, not labels: a multi-label image counts once however many classes it has
    totals = {s: len(split) if (split := getattr(data, s)) is not None else 0 for s in ("train", "val", "test")}
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
