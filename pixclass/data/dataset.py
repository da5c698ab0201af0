"""A dataset ready for training: scanned, split, decoded at the training size, with its
preprocessing (size, channels, mean/std) settled."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DatasetError
from ..progress import Reporter
from .loaders import SplitData, StreamingSplit, channel_stats, decode_all, load_split, typical_image_size
from .scan import ScannedDataset, ignored_files_note, scan_dataset, write_manifest
from .transforms import Preprocess


@dataclass
class PathSplit:
    """A split not decoded yet: file paths and label indices (multi-label: multi-hot rows) (for
    pipelines that decode only what they need, such as cached pretrained features)."""

    paths: list[Path]
    labels: list

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class PreparedData:
    scanned: ScannedDataset
    preprocess: Preprocess
    train: SplitData | StreamingSplit
    val: SplitData | StreamingSplit | None
    test: SplitData | StreamingSplit | None
    skipped: list[tuple[Path, str]]

    @property
    def classes(self) -> list[str]:
        return self.scanned.classes

    @property
    def multilabel(self) -> bool:
        """Several labels per image: the splits' labels are multi-hot rows N x K."""
        return self.scanned.multilabel

    def counts(self) -> dict:
        """{class: {split: images}} of the images actually used: unreadable files are left out."""
        table, skipped = self.scanned.counts(), {Path(p) for p, _ in self.skipped}
        for s in self.scanned.samples:
            if s.path in skipped:
                for tag in self.scanned.tags(s):
                    table[tag][s.split] -= 1
        return table

    def write_manifest(self, path: Path) -> None:
        write_manifest(self.scanned, path)


def report_skipped(skipped, reporter: Reporter) -> None:
    if not skipped:
        return
    shown = "\n  ".join(f"{p}: {reason}" for p, reason in skipped[:20])
    more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    reporter.warn(f"skipped {len(skipped)} unreadable file(s):\n  {shown}{more}")


def warn_about_scan(scanned: ScannedDataset, reporter: Reporter) -> None:
    """What the scan left out, or could not give every class: said before any work."""
    if scanned.empty_classes:
        reporter.warn(f"ignored empty class folder(s): {', '.join(scanned.empty_classes)}")
    if scanned.ignored:
        reporter.warn(ignored_files_note(scanned.ignored))
    totals = {c: sum(n.values()) for c, n in scanned.counts().items()}
    for split, missing in scanned.classes_missing_from_held_out().items():
        listed = ", ".join(f"{c} ({totals[c]} image(s) in all)" for c in missing)
        reporter.warn(f"no {split} images for class(es) {listed}: the {split} results say nothing about "
                      f"{'it' if len(missing) == 1 else 'them'}")


def _stats_sample(split, pre: Preprocess, reporter: Reporter, limit: int = 2000):
    if isinstance(split, SplitData):
        return split.images
    step = max(1, len(split.paths) // limit)
    images, _, _ = decode_all(split.paths[::step][:limit], pre, reporter, "statistics")
    return images


def prepare_data(path, channels: int = 3, image_size: int | None = None, fractions=(0.7, 0.15, 0.15), seed: int = 0,
                 manifest: Path | None = None, preprocess: Preprocess | None = None, max_memory_gb: float = 4.0,
                 reporter: Reporter | None = None, decode: bool = True,
                 scanned: ScannedDataset | None = None) -> PreparedData:
    """Scan, split and decode. With `preprocess` given (a pretrained model's, or a resumed run's)
    it is used as is; otherwise the size comes from `image_size` or the data, and mean/std are the
    training images' own statistics. With `decode=False` (needs `preprocess`) the splits are
    `PathSplit`s and unreadable files are found later, by whoever decodes."""
    reporter = reporter or Reporter()
    scanned = scanned or scan_dataset(path, fractions, seed, manifest)
    warn_about_scan(scanned, reporter)
    index = {c: i for i, c in enumerate(scanned.classes)}

    def target(sample):  # a class index, or a multi-label sample's multi-hot row
        if not scanned.multilabel:
            return index[sample.label]
        row = [0.0] * len(index)
        for tag in scanned.tags(sample):
            row[index[tag]] = 1.0
        return row

    def split_files(name):
        samples = scanned.split(name)
        return [s.path for s in samples], [target(s) for s in samples]

    train_paths, train_labels = split_files("train")
    if preprocess is None:
        size = image_size or typical_image_size(train_paths)
        preprocess = Preprocess(size=size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
        compute_stats = True
    else:
        compute_stats = False
    if not decode:
        parts = {name: PathSplit(*split_files(name)) for name in ("train", "val", "test")}
        return PreparedData(scanned, preprocess, parts["train"], parts["val"] or None, parts["test"] or None, [])
    splits, skipped = {}, []
    for name in ("train", "val", "test"):
        paths, labels = split_files(name)
        if not paths:
            splits[name] = None
            continue
        splits[name], failed = load_split(paths, labels, preprocess, reporter, max_memory_gb, what=f"loading {name}")
        skipped += failed
    if splits["train"] is None or len(splits["train"]) == 0:
        example = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DatasetError(f"no readable training images in {path} ({len(skipped)} file(s) failed to decode{example})")
    report_skipped(skipped, reporter)
    if compute_stats:
        mean, std = channel_stats(_stats_sample(splits["train"], preprocess, reporter))
        preprocess = replace(preprocess, mean=tuple(round(m, 6) for m in mean), std=tuple(round(s, 6) for s in std))
    return PreparedData(scanned, preprocess, splits["train"], splits["val"], splits["test"], skipped)
