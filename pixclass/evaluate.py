"""Evaluate a saved model on a labelled image folder: metrics, tables and figures. A multi-label
model is evaluated on a multi-label CSV (per-label precision, recall, F1 at the model's thresholds,
average precision, macro-F1 and mAP)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .abstain import abstention_metrics
from .artifact import Artifact
from .data.loaders import load_split
from .data.label_csv import is_label_csv, read_label_csv
from .data.scan import dataset_location, ignored_files_note, is_multilabel_dataset, read_manifest, scan_class_folders
from .errors import DatasetError
from .inference import Backend, TorchBackend, score_batches
from .metrics import absent_classes_note, metrics_for
from .progress import Reporter


def _run_manifest(art: Artifact, model_dir: Path | None, root: Path):
    """The split manifest of the run that trained this model, when it was trained on `root`."""
    if model_dir is None:
        return None
    manifest = Path(model_dir).parent / "manifest.csv"
    trained_on = art.config.get("data", {}).get("path")
    if manifest.is_file() and trained_on and Path(trained_on).expanduser().resolve() == root.resolve():
        return manifest
    return None


def _label_csv_pairs(path: Path, manifest: Path | None) -> tuple[list, str]:
    """(path, class) pairs of a label CSV to evaluate: the test split of the run's manifest when
    the model was trained on this CSV, else the rows whose split is test (or val), else all."""
    if manifest is not None:
        pairs = [(p, c) for p, (c, s) in read_manifest(manifest, path.parent).items() if s == "test"]
        if pairs:
            return pairs, f"the test split of {manifest}"
    rows = read_label_csv(path)
    for split in ("test", "val"):
        pairs = [(r.path, r.label) for r in rows if r.split == split]
        if pairs:
            return pairs, f"the {split} rows of {path}"
    return [(r.path, r.label) for r in rows], f"all rows of {path}"


def labelled_files(root, art: Artifact, model_dir=None, reporter: Reporter | None = None):
    """(paths, label indices, description) of the images to evaluate on.

    A folder with test/ (or only val/) subfolders is evaluated on that split. A plain class-folder
    tree that the model was trained on is evaluated on the held-out test split of its manifest;
    any other class-folder tree is evaluated in full. A label CSV likewise (_label_csv_pairs)."""
    reporter = reporter or Reporter()
    root = dataset_location(root)
    manifest = _run_manifest(art, model_dir, root) if root.exists() else None
    pairs, what, ignored = None, None, []
    if is_label_csv(root):
        pairs, what = _label_csv_pairs(root, manifest)
    elif not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    for split in ("test", "val", "valid", "validation"):
        if pairs is None and (root / split).is_dir():
            per_class = scan_class_folders(root / split, ignored)
            pairs, what = [(p, c) for c, files in per_class.items() for p in files], f"{root / split}"
            break
    if pairs is None and manifest is not None:
        rows = read_manifest(manifest, root)
        pairs = [(p, c) for p, (c, s) in rows.items() if s == "test"]
        what = f"the test split of {manifest}"
        if not pairs:
            pairs = None
    if pairs is None:
        per_class = scan_class_folders(root, ignored)
        pairs, what = [(p, c) for c, files in per_class.items() for p in files], f"all images in {root}"
    if art.multilabel != is_multilabel_dataset(root):
        raise DatasetError(f"the model is {art.task}, {root} is not: evaluate a multi-label model on a CSV with "
                           f"several space-separated labels per image, a single-label model on single labels")
    if art.multilabel:
        return _multi_hot(pairs, art.classes, root) + (what,)
    unknown = sorted({c for _, c in pairs} - set(art.classes))
    if unknown:
        raise DatasetError(f"class folder(s) not known to the model: {', '.join(unknown)} "
                           f"(model classes: {', '.join(art.classes)})")
    if not pairs:
        why = f"; {ignored_files_note(ignored)}" if ignored else ""
        raise DatasetError(f"no images found to evaluate in {root}{why}")
    if ignored:
        reporter.warn(ignored_files_note(ignored))
    index = {c: i for i, c in enumerate(art.classes)}
    return [p for p, _ in pairs], [index[c] for _, c in pairs], what


def _multi_hot(pairs, classes: list[str], root) -> tuple[list, list]:
    """(paths, multi-hot rows) of (path, "tag1 tag2") pairs."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({t for _, label in pairs for t in label.split(" ")} - set(index))
    if unknown:
        raise DatasetError(f"label(s) in {root} not known to the model: {', '.join(unknown[:10])} "
                           f"(model labels: {', '.join(classes)})")
    rows = []
    for _, label in pairs:
        row = [0.0] * len(classes)
        for tag in label.split(" "):
            row[index[tag]] = 1.0
        rows.append(row)
    return [p for p, _ in pairs], rows


def evaluate_split(art: Artifact, split, batch_size: int = 256, backend: Backend | None = None) -> tuple[dict, object]:
    """Metrics for an in-memory split; also returns the probabilities (N x K, split order). The
    artifact's PyTorch model answers unless `backend` is given (e.g. an exported file's)."""
    metrics, probs, _ = _evaluate_scores(art, split, batch_size, backend)
    return metrics, probs


def _evaluate_scores(art: Artifact, split, batch_size: int = 256, backend: Backend | None = None):
    """(metrics, probabilities N x K, feature similarities N or None)."""
    backend = backend or TorchBackend.from_artifact(art)
    probs, similarity, labels, _ = score_batches(backend, split.batches(batch_size))
    if len(labels) == 0:
        raise DatasetError("no readable images to evaluate")
    return metrics_for(labels, probs, art.classes, art.thresholds), probs, similarity


def evaluate_folder(art: Artifact, root, model_dir=None, reporter: Reporter | None = None, abstain: bool = True):
    """(metrics, probabilities, labels, paths) of the images `labelled_files` picks in `root`.
    `abstain`: with the model's abstain threshold, also the share of images it answers unknown
    and its accuracy on the others."""
    reporter = reporter or Reporter()
    paths, labels, what = labelled_files(root, art, model_dir, reporter)
    reporter.info(f"evaluating on {what} ({len(paths)} images)")
    split, failures = load_split(paths, labels, art.preprocess, reporter, what="decoding")
    for p, reason in failures:
        reporter.warn(f"skipped unreadable file {p}: {reason}")
    metrics, probs, similarity = _evaluate_scores(art, split)
    if abstain and art.abstain is not None:
        metrics.update(abstention_metrics(split.labels.numpy(), probs, art.abstain, similarity))
    metrics["skipped_files"] = [str(p) for p, _ in failures]
    metrics["evaluated_on"] = what
    note = absent_classes_note(metrics, what)
    if note:
        reporter.warn(note)
    return metrics, probs, split.labels.numpy(), split.paths


def write_evaluation(metrics: dict, classes: list[str], out_dir) -> list[Path]:
    """metrics.json, per_class.csv, confusion_matrix.json (the figures are the report's); a
    multi-label model's per_class.csv adds average precision and threshold, and it has no
    confusion matrix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics["per_class"][0]) if metrics["per_class"] else ["class"])
        writer.writeheader()
        writer.writerows(metrics["per_class"])
    if "confusion_matrix" not in metrics:
        return [out / "metrics.json", out / "per_class.csv"]
    (out / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "matrix": metrics["confusion_matrix"]}))
    return [out / "metrics.json", out / "per_class.csv", out / "confusion_matrix.json"]
