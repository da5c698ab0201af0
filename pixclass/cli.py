"""The `pixclass` command. Argument parsing and calls only; the work happens in the modules.

Heavy modules are imported inside each command, so `pixclass predict` never loads training code.
A `UserError` anywhere becomes one line on stderr and exit code 2."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError
from .runs import check_output_location

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and use image classifiers from folders of images.")


def _print_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


ABSTAIN_HELP = "on: answer 'unknown' below the model's abstain threshold (fixed on validation images); off: always a class."


def _abstain_on(value: str) -> bool:
    if value not in ("on", "off"):
        raise UserError(f"--abstain must be on or off (got {value!r})")
    return value == "on"


def _image_files(inputs) -> list[Path]:
    """The image files among `inputs` (files, folders); a user error when there are none."""
    from .data.scan import collect_image_paths, ignored_files_note
    ignored: list[Path] = []
    files = collect_image_paths(inputs, ignored)
    if not files:
        why = f"; {ignored_files_note(ignored)}" if ignored else ""
        raise UserError(f"no image files found in the given paths{why}")
    return files


def _parse_split(text: Optional[str]):
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--split must be three numbers like 0.7,0.15,0.15 (got {text!r})") from None
    return parts


def _parse_lr(text: Optional[str]):
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--lr must be a number or auto (got {text!r})") from None


def _search_config(data: Path, config: Optional[Path], **train):
    """The config `tune` and `lr-find` start from: a --config file or the defaults, DATA, and the
    few options they take (the rest as `train` resolves them)."""
    return _build_config(data, config, None, image_size=None, channels=None, split=train.pop("split"), manifest=None,
                         max_pixels=None, max_memory=None, augment=None, model=train.pop("model"),
                         recipe=train.pop("recipe"), dropout=None, pretrained=None, weights=None, **train)


def _build_config(data: Path, config: Optional[Path], resume: Optional[Path], **overrides):
    from .config import RunConfig
    if config is not None:
        cfg = RunConfig.load_yaml(config)
    elif resume is not None:
        from .train.run import check_resumable
        check_resumable(resume)
        cfg = RunConfig.load_yaml(Path(resume) / "config.yaml")
    else:
        cfg = RunConfig()
    data_path = str(data) if data is not None else cfg.data.path
    if not data_path:
        raise UserError("no dataset given (pass DATA or set data.path in the config)")
    cfg = cfg.replace("data", path=data_path, image_size=overrides.pop("image_size"), channels=overrides.pop("channels"),
                      split=_parse_split(overrides.pop("split")), manifest=overrides.pop("manifest"),
                      max_pixels=overrides.pop("max_pixels"), max_memory_gb=overrides.pop("max_memory"))
    cfg = cfg.replace("augment", policy=overrides.pop("augment"))
    if overrides["model"] is not None or overrides["recipe"] is not None:  # named now, not chosen from the images
        if overrides["recipe"] is None and cfg.train.recipe_reason:  # the model named picks its own recipe
            cfg = cfg.replace("train", recipe="auto")
        cfg = cfg.replace("train", recipe_reason="")
    cfg = cfg.replace("model", name=overrides.pop("model"), dropout=overrides.pop("dropout"),
                      pretrained=overrides.pop("pretrained"), weights=overrides.pop("weights"))
    if overrides.get("epochs") is not None:  # epochs named now: a budget's recorded cut no longer applies
        cfg = cfg.replace("train", max_steps=0)
    return cfg.replace("train", **overrides)


@app.command()
def train(
    data: Optional[Path] = typer.Argument(None, help="Class folders, a folder with train/ [val/] [test/], a label CSV "
                                        "(path,label[,split]) or a standard dataset: torchvision:cifar10, cifar100, "
                                        "mnist, fashion-mnist, kmnist, svhn."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="efficientnet_lite0 (default: ImageNet-pretrained, "
                                        "offline, fine-tuned), efficientnet_lite1/2, classic-cnn (a small CNN from "
                                        "scratch), airbench or any timm architecture name."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    lr: Optional[str] = typer.Option(None, "--lr", help="Learning rate, or auto: the learning-rate range test "
                                     "(pixclass lr-find) chooses it, and config.yaml records its choice."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size (default: the pretrained model's, else from the data)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="3 (RGB) or 1 (grayscale)."),
    augment: Optional[str] = typer.Option(None, "--augment", help="none | standard"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam | adamw | sgd"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="L2 penalty."),
    dropout: Optional[float] = typer.Option(None, "--dropout"),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant | step | cosine | onecycle | plateau"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs"),
    early_stopping: Optional[int] = typer.Option(None, "--early-stopping", help="Patience in epochs (0: off)."),
    monitor: Optional[str] = typer.Option(None, "--monitor", help="val_loss | val_accuracy"),
    split: Optional[str] = typer.Option(None, "--split", help="train,val,test fractions, e.g. 0.7,0.15,0.15"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Reuse the split of an earlier run's manifest.csv."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained",
                                              help="ImageNet weights (default: yes where they ship offline)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Start from a .safetensors/.pth state dict."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Minutes the run may take; the phases are planned to "
                                           "fit (default: 5 for transfer learning; the fast recipe's full schedule, "
                                           "at most 15)."),
    freeze: bool = typer.Option(False, "--freeze", help="Feature extractor: train only the head."),
    adversarial: bool = typer.Option(False, "--adversarial", help="Adversarial training (fast FGSM with a random "
                                     "start, ART): robust to small perturbations; the report adds PGD accuracy."),
    adversarial_eps: Optional[float] = typer.Option(None, "--adversarial-eps", help="Its ε in 1/255 pixel steps "
                                                    "(default 2)."),
    head_epochs: Optional[int] = typer.Option(None, "--head-epochs", help="Epochs with the backbone frozen."),
    unfreeze: Optional[str] = typer.Option(None, "--unfreeze", help="Fine-tune: auto, all, or the last N units."),
    feature_views: Optional[int] = typer.Option(None, "--feature-views", help="Augmented views cached per image."),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", help="Head learning rate when fine-tuning."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject larger images (default ~89 MP)."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="GB the run may hold in memory (default 4): "
                                               "decoded images and cached features beyond it are read from disk."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="auto (the model's own) | scratch | transfer | fast "
                                         "(airbench-style, small images; --model airbench-wide for a larger network)."),
    balance: Optional[str] = typer.Option(None, "--balance", help="auto (class-balanced loss weights and checkpoints "
                                          "by macro-F1 from a 3:1 class imbalance on) | off | weights | sampler"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (launches torchrun, DDP)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (mixed precision on GPUs) | fp32 | bf16 | fp16"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    track: Optional[List[str]] = typer.Option(None, "--track", help="tensorboard | mlflow (repeatable): report the run "
                                              "to TensorBoard (RUN/tensorboard/) or MLflow (MLFLOW_TRACKING_URI, "
                                              "default sqlite:///mlflow.db here); needs pixclass[track]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A config.yaml (e.g. from an earlier run)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder: a new or empty folder; one holding anything is "
                                      "refused (default: runs/<data name>, or -2, -3... when taken)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="For torchvision:NAME: a copy of the dataset's "
                                           "files (e.g. cifar-10-python.tar.gz) instead of a download."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info lines."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
):
    """Train a classifier on a folder of images."""
    import os
    from .progress import Reporter
    if data is not None or archive is not None:  # before the ranks start: one process makes the copy
        _prepare_named_dataset(str(data) if data is not None else None, archive, Reporter(quiet))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(nproc)
    from .train.run import run_training

    cfg = _build_config(data, config, resume, model=model, epochs=epochs, batch_size=batch_size, lr=_parse_lr(lr),
                        image_size=image_size, channels=channels, augment=augment, optimizer=optimizer,
                        weight_decay=weight_decay, dropout=dropout, label_smoothing=label_smoothing,
                        schedule=schedule, warmup_epochs=warmup_epochs, early_stopping=early_stopping,
                        monitor=monitor, split=split, manifest=str(manifest) if manifest else None, seed=seed,
                        threads=threads, pretrained=pretrained, weights=str(weights) if weights else None,
                        budget=budget, freeze=freeze or None, adversarial=adversarial or None,
                        adversarial_eps=adversarial_eps, head_epochs=head_epochs, unfreeze=unfreeze,
                        feature_views=feature_views, finetune_lr=finetune_lr, max_pixels=max_pixels,
                        max_memory=max_memory, recipe=recipe, precision=precision, device=device,
                        track=tuple(track) if track else None, balance=balance)
    summary = run_training(cfg, out=out if resume is None else None, resume=resume, reporter=Reporter(quiet))
    if "rank" in summary:  # a worker rank of a distributed run: rank 0 reports
        return
    if as_json:
        _print_json(summary)
    else:
        _print_train_summary(summary)


def _prepare_named_dataset(data: Optional[str], archive: Optional[Path], reporter) -> None:
    """A standard dataset's class-folder copy made now (from --archive, or downloaded), so that
    the run, and every rank of it, finds it in the cache."""
    from .data import named
    if data is None or not named.is_named(data):
        if archive is not None:
            raise UserError("--archive is for a standard dataset named like torchvision:cifar10")
        return
    if "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
        return
    named.ensure(data, archive, reporter)


def _launch_torchrun(nproc: int) -> None:
    """`pixclass train --nproc N ...` = `torchrun --nproc-per-node N -m pixclass train ...`."""
    import subprocess
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pixclass"]
    raise typer.Exit(subprocess.run(cmd + args).returncode)


def _print_train_summary(summary: dict) -> None:
    from .progress import console
    m = summary["metrics"]
    if m:
        if m.get("task") == "multilabel":
            console.print(f"{m['split']} macro F1 {m['macro_f1']:.4f}  mAP {m['mAP']:.4f}  exact match "
                          f"{m['accuracy']:.4f}  ({m['n']} images)", markup=False)
        else:
            console.print(f"{m['split']} accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  ({m['n']} images)",
                          markup=False)
    console.print(f"run folder: {summary['run_dir']}\nmodel: {summary['model_dir']}", markup=False)
    if summary.get("report"):
        console.print(f"report: {summary['report']}", markup=False)


@app.command()
def tune(
    data: Optional[Path] = typer.Argument(None, help="The dataset, as for train."),
    trials: int = typer.Option(30, "--trials", "-n", help="How many trials (settings tried)."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Minutes the search may take: no trial starts "
                                           "after them."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="As for train (default: efficientnet_lite0 for "
                                        "transfer learning)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="transfer | scratch (default: as train chooses)."),
    split: Optional[str] = typer.Option(None, "--split", help="train,val,test fractions; trials are selected on val."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the sampler and every trial (recorded in best.yaml)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Start from this config.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for tune.db and best.yaml "
                                       "(default: runs/tune-<data name>)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
):
    """Search training settings with Optuna, selected on validation; writes best.yaml for train --config."""
    from .progress import Reporter
    from .train.tune import tune as run_tune

    check_output_location(out)
    cfg = _search_config(data, config, model=model, recipe=recipe, split=split, seed=seed)
    result = run_tune(cfg, trials, budget, out, Reporter(quiet or as_json))
    if as_json:
        _print_json({"folder": str(result.folder), "best_config": str(result.best_config),
                     "best_value": result.best_value, "metric": result.metric, "best_trial": result.best_trial,
                     "seconds": result.seconds,
                     "trials": result.trials})
    else:
        _print_trials(result)


def _print_trials(result, shown: int = 10) -> None:
    from rich.table import Table

    from .progress import console
    from .train.tune import METRIC_NAMES, params_text
    metric = METRIC_NAMES[result.metric]
    done = sorted((t for t in result.trials if t["value"] is not None), key=lambda t: -t["value"])
    table = Table(title=f"best {min(shown, len(done))} of {len(result.trials)} trials")
    for col in ("trial", metric, "seconds", "settings"):
        table.add_column(col, justify="left" if col == "settings" else "right")
    for t in done[:shown]:
        table.add_row(str(t["number"]), f"{t['value']:.4f}", f"{t['seconds'] or 0:.1f}", params_text(t["params"]))
    console.print(table)
    pruned = sum(t["state"] == "pruned" for t in result.trials)
    console.print(f"{len(result.trials)} trials ({pruned} pruned) in {result.seconds:.0f}s; best: trial "
                  f"{result.best_trial}, {metric} {result.best_value:.4f}\nstudy: {result.folder / 'tune.db'} "
                  f"(optuna-dashboard opens it)\nbest config: {result.best_config} "
                  f"(pixclass train --config {result.best_config})", markup=False)


@app.command("lr-find")
def lr_find(
    data: Optional[Path] = typer.Argument(None, help="The dataset, as for train."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="As for train."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="transfer | scratch (default: as train chooses)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam | adamw | sgd"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps of the sweep (default 200)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    method: str = typer.Option("lower", "--method", help="lower (of the next two) | steepest (descent of the "
                               "smoothed loss) | minimum (the minimum's rate / 10)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Start from this config.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for lr_find.png (default: runs/lr-find-<data name>)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
):
    """The learning-rate range test: the loss over an exponential sweep of rates, and a suggested rate."""
    from .plots import lr_find_curve
    from .progress import Reporter, console
    from .runs import new_run_dir
    from .train.lr_find import METHODS
    from .train.run import find_lr_in_process

    check_output_location(out)
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    cfg = _search_config(data, config, model=model, recipe=recipe, split=None, batch_size=batch_size,
                         optimizer=optimizer, weight_decay=weight_decay, threads=threads)
    _, finding = find_lr_in_process(cfg, Reporter(quiet or as_json), steps, method)
    out = out or new_run_dir(f"lr-find-{Path(cfg.data.path).resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    plot = lr_find_curve(finding.lrs, finding.losses, {"steepest": finding.steepest, "minimum/10": finding.minimum},
                         out / "lr_find.png")
    if as_json:
        _print_json({"suggestion": finding.suggestion, "method": method, "steepest": finding.steepest,
                     "minimum": finding.minimum, "steps": len(finding.lrs), "plot": str(plot)})
    else:
        console.print(f"{finding.describe()}\nplot: {plot}\ntrain with it: --lr {finding.suggestion:.2e} "
                      f"(or --lr auto)", markup=False)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="A saved model folder."),
    data: Path = typer.Argument(..., help="Labelled class folders (or a folder with test/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write metrics and figures."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON to stdout."),
    abstain: str = typer.Option("on", "--abstain", help="on: also the share of images answered 'unknown' and "
                                "the accuracy on the others; off: leave them out."),
):
    """Evaluate a saved model: accuracy, top-k, per-class precision/recall/F1, confusion matrix."""
    from . import artifact as artifact_io
    from .evaluate import evaluate_folder, write_evaluation
    from .progress import Reporter
    from .runs import new_run_dir

    check_output_location(out)
    abstain_on = _abstain_on(abstain)
    reporter = Reporter(quiet)
    art = artifact_io.load(model)
    metrics, probs, labels, paths = evaluate_folder(art, data, model_dir=model, reporter=reporter, abstain=abstain_on)
    out = out or new_run_dir(f"eval-{Path(data).resolve().name}")
    write_evaluation(metrics, art.classes, out)
    from .report import write_report
    report = write_report(out, art, metrics, probs, labels, paths, title=f"evaluation of {model} on {data}",
                          run_info={"model folder": str(model), "data": str(data)})
    metrics["out"], metrics["report"] = str(out), str(report)
    if as_json:
        _print_json(metrics)
    else:
        _print_metrics_table(metrics)


def _print_metrics_table(metrics: dict) -> None:
    from rich.table import Table

    from .progress import console
    multilabel = metrics.get("task") == "multilabel"
    columns = ("class", "precision", "recall", "f1", *(("average_precision", "threshold") if multilabel else ()),
               "support")
    table = Table(title="per label" if multilabel else "per class")
    for col in columns:
        table.add_column(col.replace("average_precision", "AP"), justify="left" if col == "class" else "right")
    for row in metrics["per_class"]:
        table.add_row(*(row[c] if c == "class" else str(row[c]) if c == "support" else f"{row[c]:.3f}" for c in columns))
    console.print(table)
    if multilabel:
        console.print(f"macro F1 {metrics['macro_f1']:.4f}  micro F1 {metrics['micro_f1']:.4f}  mAP "
                      f"{metrics['mAP']:.4f}  exact match {metrics['accuracy']:.4f}  ({metrics['n']} images)\n"
                      f"written to {metrics['out']}\nreport: {metrics['report']}", markup=False)
        return
    topk = next(k for k in metrics if k.startswith("top") and k.endswith("_accuracy"))
    console.print(f"accuracy {metrics['accuracy']:.4f}  {topk} {metrics[topk]:.4f}  loss {metrics['loss']:.4f}  "
                  f"macro F1 {metrics['macro_f1']:.4f}  ({metrics['n']} images)\n" + _abstention_line(metrics) +
                  f"written to {metrics['out']}\n"
                  f"report: {metrics['report']}", markup=False)


def _abstention_line(metrics: dict) -> str:
    if "unknown_share" not in metrics:
        return ""
    answered = metrics["answered_accuracy"]
    return (f"answered unknown: {metrics['unknown_share']:.1%}  accuracy on the others "
            f"{'-' if answered is None else f'{answered:.4f}'}\n")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A saved model folder, or an exported .onnx or .tflite file."),
    paths: List[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table | json | csv, on stdout (default table)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to FILE.csv, .jsonl or .parquet as the "
                                       "predictions come (any number of files; needed under torchrun)."),
    resume: bool = typer.Option(False, "--resume", help="Skip the files already in --out and append the rest."),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime where it agrees with the "
                                "PyTorch model, else PyTorch) | onnxruntime | torch"),
    # small batches: on a CPU a larger one gains little, and ONNX Runtime's memory arena grows with it
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Images per model call."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject larger images (default ~89 MP)."),
    abstain: str = typer.Option("on", "--abstain", help=ABSTAIN_HELP),
):
    """Predict the classes of images (or "unknown" for images unlike the training data)."""
    from .data.decode import set_max_pixels
    from .fastest_backend import open_fastest
    from .predict import Predictor
    from .predict_run import check_output, predict_to_file
    from .progress import Reporter
    from .ranks import from_env, process_group

    set_max_pixels(max_pixels)
    abstain_on = _abstain_on(abstain)
    if fmt not in (None, "table", "json", "csv"):
        raise UserError(f"--format must be table, json or csv (got {fmt!r})")
    if resume and out is None:
        raise UserError("--resume continues an output file: give it with --out FILE")
    ranks = from_env()
    if out is not None:
        if fmt is not None or as_json:
            raise UserError("--format and --json print to stdout; with --out the file's suffix sets the format")
        check_output(out, resume)
    elif ranks.enabled:
        raise UserError("under torchrun, give the output file with --out FILE (the ranks' parts are merged into it)")
    # processes sharing this machine share its cores
    threads = max(1, (os.cpu_count() or 1) // ranks.local_world) if ranks.enabled else None
    choice = open_fastest(model, backend, threads=threads)
    predictor = Predictor(choice.backend, abstain=abstain_on)
    files = _image_files(paths)
    reporter = Reporter(quiet=not ranks.main)
    if out is not None:
        reporter.info(f"backend: {choice.reason}")
        with process_group(ranks):
            counts = predict_to_file(predictor, files, out, top_k, batch_size, resume, reporter, ranks)
        who = f"rank {ranks.rank}/{ranks.world}: " if ranks.enabled else ""  # every rank says what it did
        if counts["unreadable"]:
            reporter.warn(f"{who}{counts['unreadable']} unreadable file(s): their rows in {out} give the reason")
        Reporter().info(f"{who}{counts['predicted']} file(s) predicted into {out}"
                        + (f" ({counts['skipped']} already there)" if counts["skipped"] else ""))
        return
    results, failures = predictor.predict_files(files, k=top_k, batch_size=batch_size)
    if not results:  # nothing to print in any format: a mistake in the paths, not an empty answer
        path, reason = failures[0]
        raise UserError(f"none of the {len(files)} file(s) given could be read as an image (e.g. {path}: {reason})")
    reporter.info(f"backend: {choice.reason}")
    for p, reason in failures:
        reporter.warn(f"skipped unreadable file {p}: {reason}")
    fmt = "json" if as_json else fmt or "table"
    if fmt == "json":
        _print_json(results)
    elif fmt == "csv":
        import csv
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "class", "probability", "answer", "score"])
        for r in results:
            score = "" if r["score"] is None else f"{r['score']:.6f}"
            for rank, c in enumerate(r["top_k"], 1):
                writer.writerow([r["path"], rank, c["class"], f"{c['probability']:.6f}", r["answer"], score])
    else:
        _print_predictions(results)


def _print_predictions(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table()
    table.add_column("image", no_wrap=True)
    table.add_column("prediction")
    table.add_column("probability", justify="right")
    table.add_column("next")
    for r in results:
        # an unknown image (or a multi-label one, whose answer may be several): its likeliest classes all go to "next"
        best, rest = r["top_k"][0], r["top_k"][0 if r["unknown"] or "labels" in r else 1:]
        table.add_row(r["path"], r["answer"], f"{best['probability']:.3f}",
                      ", ".join(f"{c['class']} {c['probability']:.3f}" for c in rest))
    # piped output is not cut to 80 columns: a path split over lines is useless to grep
    width = None if sys.stdout.isatty() else max((len(r["path"]) for r in results), default=0) + 80
    Console(highlight=False, width=width).print(table)


@app.command()
def robustness(
    model: Path = typer.Argument(..., help="A saved model folder."),
    data: Path = typer.Argument(..., help="Labelled class folders (or a folder with test/), as for evaluate."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write robustness.json and robustness.html."),
    limit: int = typer.Option(200, "--limit", "-n", min=0, help="Images drawn at random from DATA (0: all of them)."),
    eps: str = typer.Option("1,2,4,8", "--eps", help="Attack sizes in 1/255 pixel steps (L∞), comma-separated."),
    pgd_steps: int = typer.Option(10, "--pgd-steps", min=1, help="PGD iterations (each of ε/4)."),
    seed: int = typer.Option(0, "--seed", help="Which images are drawn, the noise and PGD's random starts."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON to stdout."),
):
    """Accuracy under common corruptions (noise, blur, JPEG, brightness, contrast, rotation) and
    under FGSM and PGD attacks (Adversarial Robustness Toolbox), as robustness.html and .json."""
    from . import artifact as artifact_io
    from .extras import require
    from .progress import Reporter, console
    from .robustness import parse_eps, run_robustness
    from .runs import new_run_dir

    check_output_location(out)
    eps_255 = parse_eps(eps)
    require("art", "robust", "pixclass robustness")
    art = artifact_io.load(model)
    out = out or new_run_dir(f"robustness-{Path(data).resolve().name}")
    results = run_robustness(art, data, out, model_dir=model, limit=limit or None, eps_255=eps_255, steps=pgd_steps,
                             seed=seed, reporter=Reporter(quiet or as_json))
    if as_json:
        _print_json(results)
    elif not quiet:
        attacks = "  ".join(f"{name.upper()} {r['eps_255']:g}/255 {r['accuracy']:.3f}"
                            for name, rows in results["attacks"].items() for r in rows)
        console.print(f"clean accuracy {results['clean_accuracy']:.4f}  mean under corruptions "
                      f"{results['mean_corruption_accuracy']:.4f}  ({results['images']} images)\n{attacks}\n"
                      f"report: {results['report']}", markup=False)


@app.command()
def summary(
    model: str = typer.Argument(..., help="classic-cnn, airbench, a timm architecture name, or a saved model folder."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: the pretrained size, else 224."),
    classes: int = typer.Option(10, "--classes", min=2),
    channels: int = typer.Option(3, "--channels"),
    depth: int = typer.Option(3, "--depth", help="How many levels of nested layers to show."),
    freeze: bool = typer.Option(False, "--freeze", help="Show a pretrained backbone frozen (trainable = head only)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained"),
):
    """Show the layers, output shapes and parameter counts (frozen vs trainable) of a model."""
    from .models.registry import family_for, family_of
    from .models.summary import model_summary

    if Path(model).is_dir():
        from . import artifact as artifact_io
        art = artifact_io.load(model)
        net, family = art.model, family_of(art.arch)
        channels, image_size = art.preprocess.channels, art.preprocess.size
    else:
        from .config import ModelConfig
        from .models.registry import create_model
        if channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3 (got {channels})")
        model_cfg = ModelConfig(name=model, pretrained=pretrained)
        net, _ = create_model(model, classes, channels, image_size or 224, model_cfg)
        family = family_for(model, model_cfg)
        if image_size is None:
            own = family.preprocess(net, channels, None)
            image_size = own.size if own is not None else 224
    if freeze:
        frozen = family.frozen_part(net)
        if frozen is None:
            raise UserError("--freeze needs a pretrained backbone (e.g. efficientnet_lite0)")
        for p in frozen.parameters():
            p.requires_grad_(False)
    typer.echo(model_summary(net, channels, image_size, depth))


@app.command()
def explain(
    model: Path = typer.Argument(..., help="A saved model folder."),
    images: List[Path] = typer.Argument(..., help="Image files or folders."),
    method: str = typer.Option("gradcam", "--method", help="gradcam | gradcam++ | scorecam | eigencam | layercam"),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class (default: the top one)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Target layer (default: the last conv stage)."),
    out: Path = typer.Option(Path("explain"), "--out", "-o", help="Folder for the PNGs."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Heatmaps of where the model looks: original and overlay side by side, one PNG per image."""
    from . import artifact as artifact_io
    from .explain import explain_files
    from .progress import Reporter, console

    check_output_location(out)
    art = artifact_io.load(model)
    files = _image_files(images)
    written = explain_files(art, files, out, method, layer, class_name, top_k, reporter=Reporter(quiet))
    if not quiet:
        console.print(f"wrote {len(written)} explanation(s) to {out}", markup=False)


@app.command()
def filters(
    model: Path = typer.Argument(..., help="A saved model folder."),
    layer: Optional[str] = typer.Option(None, "--layer", help="A conv layer (default: the first one)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Also show this image's feature maps."),
    maps_layer: Optional[str] = typer.Option(None, "--maps-layer", help="Layer for the feature maps."),
    out: Path = typer.Option(Path("filters"), "--out", "-o"),
):
    """The first convolutional layer's filters as a grid (and optionally one image's feature maps)."""
    from . import artifact as artifact_io
    from .explain import feature_maps, filter_grid
    from .plots import save
    from .progress import console

    check_output_location(out)
    art = artifact_io.load(model)
    out.mkdir(parents=True, exist_ok=True)
    _, fig = filter_grid(art.model, layer)
    save(fig, out / "filters.png", 110)
    console.print(f"wrote {out / 'filters.png'}", markup=False)
    if image is not None:
        _, fig = feature_maps(art, image, maps_layer)
        save(fig, out / "feature_maps.png", 110)
        console.print(f"wrote {out / 'feature_maps.png'}", markup=False)


@app.command()
def export(
    model: Path = typer.Argument(..., help="A saved model folder."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | tflite | coreml | webapp"),
    int8: bool = typer.Option(False, "--int8", help="Static int8 quantization, calibrated on training images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: inside the model folder)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images to verify on (default: the run's test split)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Minimum top-1 agreement (0.99 fp32, 0.97 int8)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Export for deployment and check that the export agrees with the original."""
    from dataclasses import asdict

    from rich.table import Table

    from .export import export as run_export
    from .progress import Reporter, console

    result = run_export(model, fmt, int8, out, data, threshold, Reporter(as_json))
    if as_json:
        _print_json({**asdict(result), "passed": result.passed})
    else:
        table = Table(title="export verification")
        table.add_column("")
        table.add_column("")
        for k, v in result.rows():
            table.add_row(k, v)
        console.print(table)
    if not result.passed:
        console.print(f"error: the export disagrees with the original; kept as {result.path}", markup=False)
        raise typer.Exit(1)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="A saved model folder."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    workers: int = typer.Option(1, "--workers", min=1),
    token: Optional[str] = typer.Option(None, "--token", help="Require 'Authorization: Bearer TOKEN' on /v1."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels"),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images per model call."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="How long to gather a batch."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto: ONNX Runtime when the model's export answers like PyTorch, else "
                                     "PyTorch; or onnxruntime, torch."),
    log_db: Optional[str] = typer.Option(None, "--log-db", metavar="URL",
                                         help="Log every prediction to this database: a SQLAlchemy URL "
                                              "(sqlite:///FILE, postgresql://...) or a SQLite file."),
    log_images: bool = typer.Option(False, "--log-images", help="Also store each image (for `pixclass feedback export`)."),
    log_image_limit_kb: int = typer.Option(1024, "--log-image-limit-kb", min=1,
                                           help="Images larger than this are logged without their bytes."),
    log_queue: int = typer.Option(1000, "--log-queue", min=1,
                                  help="Predictions that may wait for the database; beyond, they are dropped and counted."),
    abstain: str = typer.Option("on", "--abstain", help=ABSTAIN_HELP),
):
    """Serve the model: an upload page at / and a JSON API under /v1 (docs at /docs)."""
    import json
    import os
    from dataclasses import asdict

    if log_images and not log_db:
        raise UserError("--log-images needs --log-db URL")
    if log_db:
        # reachable, and at the current schema before the workers start (not each one migrating)
        from .serve.log_db import open_log
        open_log(log_db, create=True).dispose()

    import uvicorn

    from .data.decode import DEFAULT_MAX_PIXELS
    from .serve.app import Settings, available_cores
    settings = Settings(model=str(model), token=token, max_upload_mb=max_upload_mb,
                        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                        model_threads=max(1, available_cores() // workers), log_db=log_db, log_images=log_images,
                        log_image_limit_kb=log_image_limit_kb, log_queue=log_queue, abstain=_abstain_on(abstain),
                        **_serving_backend(model, backend))
    os.environ["PIXCLASS_SERVE_SETTINGS"] = json.dumps(asdict(settings))
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler that
    # was there before it: make that one a no-op so a clean shutdown exits with 0
    import signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run("pixclass.serve.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=30)


def _serving_backend(model: Path, backend: str) -> dict:
    """Settings fields for the backend the workers run, chosen here once: a bad model folder or an
    unusable --backend fails with one line rather than in every worker, the ONNX export is made
    (and cached) once, and a fallback to PyTorch is warned about once."""
    from . import artifact as artifact_io
    from .fastest_backend import open_fastest
    artifact_io.load(model)  # the service needs the saved model folder itself (explain, /v1/model)
    choice = open_fastest(model, backend)
    return {"backend": choice.backend.name, "backend_reason": choice.reason}


feedback_app = typer.Typer(no_args_is_help=True,
                           help="Corrections sent to `pixclass serve --log-db` (POST /v1/feedback).")
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    url: str = typer.Argument(..., help="The prediction log: a SQLAlchemy URL or a SQLite file."),
    out_dir: Path = typer.Argument(..., help="Where the class folders go (created; existing files are kept)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Write the corrected images (feedback on predictions logged with --log-images) as class folders for `pixclass train`."""
    from dataclasses import asdict

    from .progress import console
    from .serve.feedback_export import export_corrections

    result = export_corrections(url, out_dir)
    if as_json:
        _print_json(asdict(result))
        return
    written = sum(result.written.values())
    console.print(f"wrote {written} image(s) into {len(result.written)} class folder(s) under {result.out_dir}"
                  f" ({result.already_there} already there, {result.without_image} corrected without a stored image)",
                  markup=False)


@app.command()
def audit(
    data: Path = typer.Argument(..., help="The dataset folder to check."),
    decisions: Optional[Path] = typer.Argument(None, help="With --fix relabel: the decisions CSV (label_issues.csv "
                                               "with its accept column filled in)."),
    fix: Optional[str] = typer.Option(None, "--fix", help="quarantine: move problem files out of the dataset; "
                                      "relabel DECISIONS.csv: move the accepted files into their suggested class."),
    quarantine_dir: Optional[Path] = typer.Option(None, "--quarantine-dir", help="Default: DATA.quarantine beside DATA."),
    labels: bool = typer.Option(False, "--labels", help="Also rank likely label errors (out-of-fold predictions on "
                                "pretrained features, cleanlab) with a suggested class."),
    folds: int = typer.Option(5, "--folds", min=2, help="With --labels: folds of the out-of-fold predictions."),
    undo: Optional[Path] = typer.Option(None, "--undo", help="Move back the files of a --fix relabel log."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write audit.json and audit.html."),
    min_size: int = typer.Option(32, "--min-size", help="Images with a side below this are reported as tiny."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject larger images (decompression bombs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Check a dataset: unreadable files, duplicates, leakage, conflicting labels, imbalance, label errors..."""
    from . import audit_report
    from .data.audit import audit as run_audit, quarantine
    from .data.decode import DEFAULT_MAX_PIXELS
    from .data.scan import dataset_name
    from .progress import Reporter, console
    from .runs import new_run_dir

    if fix not in (None, "quarantine", "relabel"):
        raise UserError(f"--fix must be 'quarantine' or 'relabel' (got {fix!r})")
    if (fix == "relabel") != (decisions is not None):
        raise UserError("--fix relabel takes a decisions CSV: pixclass audit DATA --fix relabel DECISIONS.csv")
    if fix == "relabel" or undo is not None:
        _relabel_or_undo(data, decisions, undo, as_json, quiet)
        return
    check_output_location(out)
    if fix is not None:
        check_output_location(quarantine_dir, "--quarantine-dir")
    report = run_audit(str(data), min_size=min_size, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, reporter=Reporter(quiet))
    out = out or new_run_dir(f"audit-{dataset_name(str(data))}")
    found = None
    if labels:
        from .label_issues import find_label_issues
        found = find_label_issues(data, folds=folds, reporter=Reporter(quiet)).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    audit_report.write_json(report, out / "audit.json", found)
    audit_report.write_html(report, out / "audit.html", found)
    if found is not None:
        audit_report.write_decisions(found, out / "label_issues.csv")
    moved = []
    if fix == "quarantine":
        folder, moved = quarantine(report, quarantine_dir)
        if not quiet:
            console.print(f"moved {len(moved)} file(s) to {folder} (log: {folder / 'quarantine.csv'})", markup=False)
    if as_json:
        _print_json({**report.to_dict(), "report": str(out / "audit.html"),
                     "quarantined": [[str(a), str(b), r] for a, b, r in moved],
                     **({"label_issues": found} if found is not None else {})})
    elif not quiet:
        audit_report.print_summary(report, console)
        if found is not None:
            console.print(f"likely label errors: {found['count']} of {found['images']} images; decide in "
                          f"{out / 'label_issues.csv'} (accept column), then: pixclass audit {data} --fix relabel "
                          f"{out / 'label_issues.csv'}", markup=False)
        console.print(f"report: {out / 'audit.html'}  (and audit.json)", markup=False)


def _relabel_or_undo(data: Path, decisions: Optional[Path], log: Optional[Path], as_json: bool, quiet: bool) -> None:
    from .data.relabel import read_decisions, relabel, undo
    from .progress import console
    if log is not None:
        if decisions is not None:
            raise UserError("--undo and --fix relabel go in separate commands")
        result = {"undone": str(log), "moved_back": undo(log)}
        line = f"moved {result['moved_back']} file(s) back (log renamed to {log}.undone)"
    else:
        written, moved = relabel(data, read_decisions(decisions))
        result = {"log": str(written), "moved": moved}
        line = f"moved {moved} file(s) to their new class; undo with: pixclass audit {data} --undo {written}"
    if as_json:
        _print_json(result)
    elif not quiet:
        console.print(line, markup=False)


@app.command("add-class")
def add_class(
    model: Path = typer.Argument(..., help="A few-shot model folder (trained by the fewshot recipe)."),
    folder: Path = typer.Argument(..., help="A folder of images of the new class."),
    name: Optional[str] = typer.Option(None, "--name", help="The new class's name (default: the folder's name)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The new model folder (default: MODEL-NAME beside MODEL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Add a class to a few-shot model from a folder of its images; the other classes stay as they are."""
    from .add_class import add_class as run_add_class
    check_output_location(out)
    result = run_add_class(model, folder, name, out)
    if as_json:
        _print_json(result)
    else:
        print(f"added class {result['added']!r} from {result['images']} images: {result['model_dir']} "
              f"({len(result['classes'])} classes)")


@app.command()
def suggest(
    model: Path = typer.Argument(..., help="A saved model folder."),
    unlabeled: Path = typer.Argument(..., help="A folder of unlabeled images."),
    n: int = typer.Option(50, "--n", help="How many images to suggest."),
    by: str = typer.Option("margin", "--by", help="Uncertainty measure: margin or entropy."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write suggest.csv and suggest.html."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Rank unlabeled images by how much labeling them would teach the model (uncertain, and diverse)."""
    from .runs import new_run_dir
    from .suggest import suggest as run_suggest
    check_output_location(out)
    out = out or new_run_dir(f"suggest-{unlabeled.name}")
    result = run_suggest(model, unlabeled, n, out, by)
    if as_json:
        _print_json(result)
    else:
        print(f"{result['suggested']} of {result['images']} images to label next: {out / 'suggest.html'} "
              f"(and suggest.csv)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder."),
    epochs: int = typer.Option(15, "--epochs", "-e"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train the classic CNN on scikit-learn's bundled handwritten digits (no download needed)."""
    from .demo import run_demo
    run_demo(out, epochs, quiet)


def _click_exceptions():
    """The exception module of the click that typer parses with. typer 0.29 vendors its own copy
    (typer._click), whose classes are not the `click` package's; older typers use `click` itself.
    Asking typer which one it raises keeps `main` right for either."""
    return importlib.import_module(typer.BadParameter.__module__)


def _usage_error_line(e) -> str:
    """One line for a usage error, pointing at the command's --help."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


_INTERRUPTED = 130  # the shell's exit code for a command stopped by Ctrl-C (128 + SIGINT)


def main(argv=None) -> None:
    """Run the command; exit 0, 2 on a user or usage error (one `error:` line), 130 on Ctrl-C."""
    click_errors = _click_exceptions()
    help_instead = getattr(click_errors, "NoArgsIsHelpError", ())  # bare `pixclass`: the help text, as click does
    try:
        result = app(args=argv, standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except help_instead as e:
        e.show()
        sys.exit(2)
    except click_errors.UsageError as e:
        typer.echo(f"error: {_usage_error_line(e)}", err=True)
        sys.exit(2)
    except click_errors.ClickException as e:
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # older typers turn Ctrl-C into Abort
        result = _INTERRUPTED
    # typer 0.29 turns Ctrl-C inside a command into a returned exit code 130
    code = result if isinstance(result, int) else 0
    if code == _INTERRUPTED:
        typer.echo("interrupted", err=True)
    sys.exit(code)


def run() -> None:
    """The console entry point: main(), then an immediate exit once the exit handlers have run
    and the output is flushed. Tearing down the interpreter after torch, timm and torchvision
    are imported (module and object finalization) takes seconds and writes nothing: every file is
    closed by then (the cost: bench/RESULTS.md, "Speed tricks")."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()
