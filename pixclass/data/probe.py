"""How big a dataset's images are, from a bounded, deterministic sample of file headers: what
`--recipe auto` needs before anything is scanned or decoded (train/recipes choose_recipe). Only
the training folder's listing and the sampled headers are read, so it costs well under a second
even for tens of thousands of files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError, ImageDecodeError
from .decode import read_size
from .label_csv import is_label_csv, read_label_csv
from .scan import collect_image_paths, dataset_location, has_image_extension, is_hidden, split_folders


@dataclass(frozen=True)
class SizeProbe:
    median_side: int | None  # median of max(width, height) over the sample; None: no header read
    sampled: int  # headers read
    train_images: int  # image files in the training class folders
    split_folders: tuple[str, ...] = ()  # the splits given as folders ("train", "val", "test"), if any
    largest_class: int = 0  # image files in the training folder's largest class (few-shot below a few)


def _class_images(folder: Path) -> list[Path]:
    """The image files directly in a class folder, sorted; the nested ones only when there are
    none at the top (a listing, no stat per file: os.scandir knows the entry types)."""
    with os.scandir(folder) as entries:
        found = sorted(folder / e.name for e in entries
                       if e.is_file() and not is_hidden(Path(e.name)) and has_image_extension(Path(e.name)))
    return found or collect_image_paths([folder])


def _csv_class_images(path: Path) -> list[list[Path]]:
    """A label CSV's training images (all rows when none names a split), per class. A CSV that
    cannot be read gives none: the scan that follows names the problem."""
    try:
        rows = read_label_csv(path)
    except DatasetError:
        return []
    per_class: dict[str, list[Path]] = {}
    for row in rows:
        if row.split in (None, "train"):
            per_class.setdefault(row.label, []).append(row.path)
    return [sorted(files) for _, files in sorted(per_class.items())]


def probe_image_sizes(root, sample: int = 200) -> SizeProbe:
    """The median side of about `sample` training images, spread evenly over the classes and
    within each class (the same files every time). A folder that is missing or holds no class
    folders gives an empty probe: the scan that follows names the problem."""
    root = dataset_location(root)
    try:
        splits = split_folders(root) if root.is_dir() else {}
        if is_label_csv(root):
            per_class = _csv_class_images(root)
        else:
            folder = splits.get("train", root) if root.is_dir() else None
            classes = sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden(d)) if folder else []
            per_class = [_class_images(d) for d in classes]
    except OSError:
        return SizeProbe(None, 0, 0)
    quota = max(1, sample // max(1, len(per_class)))
    sides = []
    for files in per_class:
        step = max(1, len(files) // quota)
        for path in files[::step][:quota]:
            try:
                sides.append(max(read_size(path)))
            except ImageDecodeError:  # the scan and decoding report unreadable files
                continue
    total = sum(len(files) for files in per_class)
    largest = max((len(files) for files in per_class), default=0)
    if not sides:
        return SizeProbe(None, 0, total, tuple(splits), largest)
    sides.sort()
    return SizeProbe(sides[len(sides) // 2], len(sides), total, tuple(splits), largest)
