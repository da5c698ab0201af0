"""Find the images and classes in a dataset folder and assign each file to a split.

Three layouts are understood:
- class folders directly under DATA: split here, stratified and seeded (70/15/15 by default);
- DATA/train/<class>/..., with optional val|valid|validation/ and test/ subfolders;
- a CSV of labels (DATA.csv: path,label[,split]; label_csv.py), split like class folders unless
  its rows name their split; with several space-separated tags in a label cell, a multi-label
  dataset (`multilabel`: the classes are the tags, a sample's label its tags joined by spaces),
  split at random (seeded) since no one class stratifies it.
A standard dataset named "torchvision:NAME" is its split-folder copy in the cache (named.py).
The split is written as a manifest (CSV: path, class, split); given an earlier manifest, every file
listed there keeps its split and only new files are assigned.

Only files with an image extension are data; the others in the class folders are kept in
`ScannedDataset.ignored` so that training can say what it left out (and `audit` agrees with it)."""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError, UserError
from . import named
from .label_csv import is_label_csv, is_multilabel, read_label_csv

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
_SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.startswith("__")


def has_image_extension(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Files below `folder` (recursively) that have an image extension, hidden entries skipped;
    the other files are added to `ignored` when it is given."""
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(is_hidden(Path(part)) for part in rel.parts) or not p.is_file():
            continue
        if has_image_extension(p):
            found.append(p)
        elif ignored is not None:
            ignored.append(p)
    return found


def ignored_files_note(ignored: list[Path]) -> str:
    """One warning about files left out for their extension: how many, which extensions, an example."""
    kinds = Counter(p.suffix.lower() or "no extension" for p in ignored)
    listed = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
    return (f"ignored {len(ignored)} file(s) without an image extension ({listed}; e.g. {ignored[0]}): only "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files are read; rename the ones that are images")


def collect_image_paths(inputs, ignored: list[Path] | None = None) -> list[Path]:
    """Files as given, folders searched recursively for image files (hidden entries skipped); for
    predict, explain and export, which take any mix of files and folders. Files in those folders
    without an image extension are added to `ignored` when it is given."""
    found = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += _images_in(p, ignored)
        elif p.exists():
            found.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return found


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not is_hidden(d)), key=lambda d: d.name)


def split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in _SPLIT_FOLDER_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def scan_class_folders(folder: Path, ignored: list[Path] | None = None) -> dict[str, list[Path]]:
    """{class name: image files}, classes sorted by name; files without an image extension are
    added to `ignored` when it is given."""
    return {d.name: _images_in(d, ignored) for d in _class_dirs(folder)}


@dataclass
class ScannedDataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str  # "class-folders", "split-folders" or "label-csv"
    empty_classes: list[str] = field(default_factory=list)  # folders without images: not classes
    ignored: list[Path] = field(default_factory=list)  # files in class folders without an image extension
    multilabel: bool = False  # a multi-label CSV: each sample's label is its tags joined by spaces

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def tags(self, sample: Sample) -> list[str]:
        """The classes of a sample: its one label, or a multi-label sample's tags."""
        return sample.label.split(" ") if self.multilabel else [sample.label]

    def classes_missing_from_held_out(self) -> dict[str, list[str]]:
        """{split: classes without an image there} for the val and test splits that have images:
        such a class is never validated or tested, and a score over that split says nothing of it."""
        present = {name: {t for s in self.samples if s.split == name for t in self.tags(s)} for name in ("val", "test")}
        return {name: [c for c in self.classes if c not in labels] for name, labels in present.items()
                if labels and not labels >= set(self.classes)}

    def counts(self) -> dict[str, dict[str, int]]:
        """{class: {split: images}}; a multi-label image counts once for each of its tags."""
        table = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for s in self.samples:
            for tag in self.tags(s):
                table[tag][s.split] += 1
        return table


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")


def _check_classes(per_class: dict[str, list[Path]], where: Path, ignored: list[Path]) -> list[str]:
    """Raise on an unusable set of classes; drop (and return the names of) empty class folders."""
    if not per_class:
        raise DatasetError(f"no class folders found in {where} (expected one subfolder per class)")
    if sum(len(v) for v in per_class.values()) == 0:
        if ignored:  # say what was there, so the user can rename it
            raise DatasetError(f"no images found in {where}: {ignored_files_note(ignored)}")
        raise DatasetError(f"no images found in {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    empty = [c for c, files in per_class.items() if not files]
    for c in empty:
        del per_class[c]
    if len(per_class) < 2:
        raise DatasetError(f"only one class ({next(iter(per_class))}) found in {where}; need at least 2")
    small = [c for c, files in per_class.items() if len(files) < 2]
    if small:
        raise DatasetError(f"class(es) with fewer than 2 images in {where}: {', '.join(small)}")
    return empty


def _stable_fraction(path: Path, seed: int) -> float:
    """A number in [0, 1) fixed by the file's path and the seed, for assigning new files."""
    digest = hashlib.sha256(f"{seed}:{path.as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out_sizes(n: int, f_val: float, f_test: float) -> tuple[int, int]:
    """(val, test) image counts for a class of n images: round(fraction * n), but at least one in
    each split that has a fraction, so that a small class is still validated and tested; at least
    one image stays in train. Too small a class for all three loses val before test (the split
    the run reports on)."""
    room = n - 1
    n_test = min(max(round(n * f_test), int(f_test > 0)), room)
    n_val = min(max(round(n * f_val), int(f_val > 0)), room - n_test)
    if n_val == 0 < f_val and n_test > 1:  # test took the whole room: val gets one back
        n_test, n_val = n_test - 1, 1
    return n_val, n_test


def stratified_split(per_class: dict[str, list[Path]], fractions, seed: int) -> dict[Path, str]:
    """Per class, shuffle with the seed and cut into train/val/test by the fractions (sizes:
    `held_out_sizes`)."""
    _, f_val, f_test = fractions
    assignment = {}
    rng = random.Random(seed)
    for label in sorted(per_class):
        files = sorted(per_class[label])
        rng.shuffle(files)
        n_val, n_test = held_out_sizes(len(files), f_val, f_test)
        for i, p in enumerate(files):
            assignment[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def _assign_new_file(path: Path, fractions, seed: int) -> str:
    x = _stable_fraction(path, seed)
    f_train, f_val, _ = fractions
    return "train" if x < f_train else "val" if x < f_train + f_val else "test"


def dataset_location(data) -> Path:
    """The folder or CSV file a dataset argument stands for: "torchvision:NAME" is the standard
    dataset's class-folder copy in the cache, made now if missing; anything else is a path."""
    return named.ensure(data) if named.is_named(data) else Path(data).expanduser()


def dataset_name(data) -> str:
    """A short name for a dataset argument, for run folders: the folder's, the CSV's stem, the
    standard dataset's."""
    if named.is_named(data):
        return named.lookup(data).name
    p = Path(data).expanduser().resolve()
    return p.stem if p.suffix.lower() == ".csv" else p.name


def is_multilabel_dataset(data) -> bool:
    """Whether a dataset argument is a multi-label CSV (a cell with several tags). A CSV that
    cannot be read is not: the scan that follows names the problem."""
    if named.is_named(data) or not is_label_csv(data):
        return False
    try:
        return is_multilabel(read_label_csv(data))
    except DatasetError:
        return False


def dataset_files(location: Path) -> list[Path]:
    """Every image of a dataset location (a folder or a label CSV), whatever its label or split."""
    if is_label_csv(location):
        return [row.path for row in read_label_csv(location)]
    return collect_image_paths([location])


def scan_dataset(root, fractions=(0.7, 0.15, 0.15), seed: int = 0, manifest: Path | None = None) -> ScannedDataset:
    root = dataset_location(root)
    if is_label_csv(root):
        return _scan_label_csv(root, fractions, seed, manifest)
    _check_root(root)
    split_dirs = split_folders(root)
    if "train" in split_dirs:
        ignored: list[Path] = []
        tables = {split: scan_class_folders(d, ignored) for split, d in split_dirs.items()}
        return _scan_given_splits(root, tables, split_dirs, fractions, seed, ignored, "split-folders", manifest)
    ignored = []
    per_class = scan_class_folders(root, ignored)
    return _scan_unsplit(root, per_class, root, fractions, seed, manifest, ignored, "class-folders")


def _scan_unsplit(root: Path, per_class: dict[str, list[Path]], where, fractions, seed, manifest, ignored,
                  layout: str) -> ScannedDataset:
    """Split files that come with none: stratified and seeded, or as an earlier manifest says."""
    empty = _check_classes(per_class, where, ignored)
    previous = read_manifest(manifest, root) if manifest else {}
    fresh = {label: [p for p in files if p not in previous] for label, files in per_class.items()}
    assignment = stratified_split(fresh, fractions, seed) if not previous else {
        p: _assign_new_file(Path(os.path.relpath(p, root)), fractions, seed) for files in fresh.values() for p in files}
    assignment.update({p: s for p, (_, s) in previous.items()})
    samples = [Sample(p, label, assignment[p]) for label, files in per_class.items() for p in files]
    return ScannedDataset(root, sorted(per_class), samples, layout, empty, ignored)


def _scan_label_csv(path: Path, fractions, seed, manifest) -> ScannedDataset:
    rows = read_label_csv(path)
    given = {r.split is not None for r in rows}
    if given == {True, False}:
        raise DatasetError(f"{path}: some rows name a split and some do not; give every row a split or none")
    if is_multilabel(rows):
        return _scan_multilabel(path, rows, fractions, seed, manifest)
    # classes by name, files by path, as a folder scan lists them: the same images in a CSV and
    # in folders give the same split and the same training order
    tables: dict[str, dict[str, list[Path]]] = {}
    for r in sorted(rows, key=lambda r: (r.label, r.path)):
        tables.setdefault(r.split or "all", {}).setdefault(r.label, []).append(r.path)
    if "all" in tables:
        return _scan_unsplit(path.parent, tables["all"], path, fractions, seed, manifest, [], "label-csv")
    if "train" not in tables:
        raise DatasetError(f"{path}: no row has the split 'train'")
    where = {split: f"{path} (split {split})" for split in tables}
    return _scan_given_splits(path.parent, tables, where, fractions, seed, [], "label-csv", manifest)


def _scan_multilabel(path: Path, rows, fractions, seed, manifest) -> ScannedDataset:
    """A multi-label CSV: the classes are its tags; rows without a split are split at random,
    seeded (as one group: `stratified_split`'s sizes), or as an earlier manifest says."""
    rows = sorted(rows, key=lambda r: r.path)
    tag_counts = Counter(t for r in rows if r.split in (None, "train") for t in r.tags)
    if len(tag_counts) < 2:
        raise DatasetError(f"{path}: a multi-label CSV needs at least 2 tags among its training rows")
    if rows[0].split is not None:
        if not any(r.split == "train" for r in rows):
            raise DatasetError(f"{path}: no row has the split 'train'")
        unknown = sorted({t for r in rows for t in r.tags} - set(tag_counts))
        if unknown:
            raise DatasetError(f"{path}: tag(s) {', '.join(unknown[:5])} have no training row")
        assignment = {r.path: r.split for r in rows}
    else:
        previous = read_manifest(manifest, path.parent) if manifest else {}
        fresh = [r.path for r in rows if r.path not in previous]
        assignment = stratified_split({"all": fresh}, fractions, seed) if not previous else {
            p: _assign_new_file(Path(os.path.relpath(p, path.parent)), fractions, seed) for p in fresh}
        assignment.update({p: s for p, (_, s) in previous.items()})
    samples = [Sample(r.path, r.label, assignment[r.path]) for r in rows]
    return ScannedDataset(path.parent, sorted(tag_counts), samples, "label-csv", multilabel=True)


def _scan_given_splits(root: Path, tables: dict[str, dict[str, list[Path]]], where: dict, fractions, seed,
                       ignored: list[Path], layout: str, manifest: Path | None = None) -> ScannedDataset:
    """Files whose split is given (folders or a CSV column); without a val split one is carved
    out of train, stratified, unless --split asks for none. With an earlier run's manifest the
    carve is that run's: a training file it lists keeps its train or val (so `--manifest` reruns
    judge and calibrate on the same images whatever --split or the recipe's own carve says), and a
    file it does not list is placed by its path, as in an unsplit folder. The given val and test
    files stay where the folders or the CSV put them."""
    train = tables["train"]
    empty = _check_classes(train, where["train"], ignored)
    classes = sorted(train)
    samples: list[Sample] = []
    previous = read_manifest(manifest, root) if manifest and "val" not in tables else {}
    carved = {p: split for p, (_, split) in previous.items() if split in ("train", "val")}
    f_val = fractions[1] / (fractions[0] + fractions[1]) if fractions[0] + fractions[1] else 0.0  # of train/
    if carved:
        assignment = {p: carved.get(p) or _assign_new_file(Path(os.path.relpath(p, root)), (1 - f_val, f_val, 0.0), seed)
                      for files in train.values() for p in files}
    elif "val" in tables or fractions[1] == 0:  # given, or asked for none (--split 1,0,0)
        assignment = {p: "train" for files in train.values() for p in files}
    else:  # carve a validation set out of train/, stratified like a full split
        assignment = stratified_split(train, (1 - f_val, f_val, 0.0), seed)
    samples += [Sample(p, label, assignment[p]) for label, files in train.items() for p in files]
    for split in ("val", "test"):
        for label, files in tables.get(split, {}).items():
            if not files:
                continue
            if label not in train:
                raise DatasetError(f"class {label!r} in {where[split]} has no images in {where['train']}")
            samples += [Sample(p, label, split) for p in files]
    return ScannedDataset(root, classes, samples, layout, empty, ignored)


def write_manifest(dataset: ScannedDataset, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "split"])
        for s in dataset.samples:
            # relpath, not relative_to: a label CSV may list files outside its own folder
            writer.writerow([Path(os.path.relpath(s.path, dataset.root)).as_posix(), s.label, s.split])


def read_manifest(path: Path, root: Path) -> dict[Path, tuple[str, str]]:
    """{absolute path: (class, split)} for the files of a manifest that still exist."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "class", "split"} <= set(reader.fieldnames):
            raise DatasetError(f"manifest {path} must have the columns path, class, split")
        for row in reader:
            if row["split"] not in SPLITS:
                raise DatasetError(f"manifest {path}: unknown split {row['split']!r}")
            p = root / row["path"]
            if p.exists():
                out[p] = (row["class"], row["split"])
    return out
