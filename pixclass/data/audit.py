"""The dataset doctor: find what would hurt training before it does.

Every file is fully decoded (not just its header). Findings:
- unreadable: zero-byte, corrupt, truncated or non-image files (with an image extension or not);
- images that training leaves out because their name has no image extension (a JPEG named .heic,
  a file without an extension): reported, not counted, as `pixclass train` does not read them;
- hidden files and folders (never used as data), empty classes;
- tiny images, mixed colour modes, EXIF-rotated and animated images;
- exact duplicates (same bytes) and near-duplicates (perceptual hash) within a class, across
  classes (conflicting labels) and across splits (train/test leakage);
- class counts and the imbalance ratio.
Auditing never writes into the dataset; `quarantine` moves (never deletes, never rewrites) the
files that should not be trained on into a separate folder, with a CSV log."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError, ImageDecodeError, UserError
from .decode import DEFAULT_MAX_PIXELS, open_image
from .label_csv import is_label_csv, read_label_csv
from .scan import dataset_location, has_image_extension, split_folders, is_hidden

NEAR_DUPLICATE_BITS = 4  # dHash Hamming distance at or below which two images count as near-duplicates


@dataclass
class FileInfo:
    path: Path
    label: str | None
    split: str
    size_bytes: int
    sha256: str
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    frames: int = 1
    exif_rotated: bool = False
    dhash: int | None = None
    error: str | None = None
    ignored: bool = False  # an image training does not read (no image extension)


@dataclass
class AuditReport:
    root: Path
    layout: str
    files: list[FileInfo]
    problems: dict[str, list[dict]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    imbalance_ratio: float | None = None

    def to_dict(self) -> dict:
        return {"root": str(self.root), "layout": self.layout, "files": len(self.files),
                "counts": self.counts, "imbalance_ratio": self.imbalance_ratio,
                "problems": {k: v for k, v in self.problems.items()}}

    def quarantine_candidates(self) -> dict[Path, str]:
        """Files that should not be trained on, with the reason: unreadable ones, redundant exact
        duplicates, conflicting labels, and training copies of images that are also in val/test."""
        out: dict[Path, str] = {}
        for item in self.problems.get("unreadable", []):
            out.setdefault(Path(item["path"]), f"unreadable: {item['reason']}")
        for kind in ("leakage", "conflicting_labels", "duplicates"):
            for group in self.problems.get(kind, []):
                if group["match"] != "exact":
                    continue
                paths = [Path(p) for p in group["paths"]]
                if kind == "leakage":
                    victims = [p for p, s in zip(paths, group["splits"]) if s == "train"]
                elif kind == "conflicting_labels":
                    victims = paths
                else:
                    victims = paths[1:]
                for p in victims:
                    out.setdefault(p, f"{kind.replace('_', ' ')} (exact copy)")
        return out


def _walk(root: Path):
    """(path, label, split, hidden) for every file below root."""
    split_dirs = split_folders(root)
    layout = "split-folders" if "train" in split_dirs else "class-folders"
    tops = {s: d for s, d in split_dirs.items()} if layout == "split-folders" else {"": root}
    entries = []
    for split, top in tops.items():
        for p in sorted(top.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(top)
            hidden = any(is_hidden(Path(part)) for part in rel.parts)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            entries.append((p, label, split or "all", hidden))
    return layout, tops, entries


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: brightness gradients of a 9x8 thumbnail. (A dozen lines here rather
    than a dependency: the imagehash package brings SciPy and PyWavelets for it.)"""
    small = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _inspect(path: Path, label, split, max_pixels: int) -> FileInfo:
    data = path.read_bytes()
    info = FileInfo(path, label, split, len(data), hashlib.sha256(data).hexdigest())
    if not data:
        info.error = "zero-byte file"
        return info
    try:
        img = open_image(data, max_pixels)  # full decode: catches truncation, not just bad headers
    except ImageDecodeError as e:
        info.error = e.reason
        return info
    info.width, info.height, info.mode, info.format = img.width, img.height, img.mode, img.format or ""
    info.frames = getattr(img, "n_frames", 1)
    try:
        info.exif_rotated = img.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:
        info.exif_rotated = False
    info.dhash = dhash(img)
    return info


def _mode_family(mode: str) -> str:
    return {"1": "gray", "L": "gray", "LA": "gray+alpha", "I": "gray16", "I;16": "gray16", "F": "gray16",
            "P": "rgb", "PA": "rgb+alpha", "RGB": "rgb", "RGBA": "rgb+alpha", "CMYK": "cmyk"}.get(mode, mode)


def _groups(files: list[FileInfo], key) -> list[list[FileInfo]]:
    buckets = defaultdict(list)
    for f in files:
        k = key(f)
        if k is not None:
            buckets[k].append(f)
    return [g for g in buckets.values() if len(g) > 1]


def _near_groups(files: list[FileInfo], bits: int) -> list[list[FileInfo]]:
    """Pairs within `bits` Hamming distance, found through 4 bands of 16 bits (two hashes that
    differ in at most 3 bits agree exactly on at least one band), then merged into groups."""
    with_hash = [f for f in files if f.dhash is not None]
    parent = list(range(len(with_hash)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(4):
        buckets = defaultdict(list)
        for i, f in enumerate(with_hash):
            buckets[(f.dhash >> (16 * band)) & 0xFFFF].append(i)
        for members in buckets.values():
            for a_i, a in enumerate(members):
                for b in members[a_i + 1:]:
                    if bin(with_hash[a].dhash ^ with_hash[b].dhash).count("1") <= bits:
                        parent[find(a)] = find(b)
    groups = defaultdict(list)
    for i in range(len(with_hash)):
        groups[find(i)].append(with_hash[i])
    return [g for g in groups.values() if len(g) > 1]


def _describe(group: list[FileInfo], match: str) -> dict:
    return {"match": match, "paths": [str(f.path) for f in group], "classes": [f.label for f in group],
            "splits": [f.split for f in group]}


def audit(root, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS, near_bits: int = NEAR_DUPLICATE_BITS,
          reporter=None) -> AuditReport:
    root = dataset_location(root)
    if is_label_csv(root):
        layout, tops, entries = "label-csv", {}, [(r.path, r.label, r.split or "all", False)
                                                  for r in read_label_csv(root)]
    elif not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    else:
        layout, tops, entries = _walk(root)
    problems: dict[str, list[dict]] = defaultdict(list)
    files: list[FileInfo] = []
    hidden_dirs = set()
    candidates = []
    for p, label, split, hidden in entries:
        if hidden:
            rel = p.relative_to(root)
            hidden_part = next(part for part in rel.parts if is_hidden(Path(part)))
            top = rel.parts[:rel.parts.index(hidden_part) + 1]
            hidden_dirs.add(str(root.joinpath(*top)))
        elif label is None:
            problems["stray_files"].append({"path": str(p), "reason": "file outside any class folder"})
        else:
            candidates.append((p, label, split))
    from contextlib import nullcontext
    bar = reporter.bar("auditing", len(candidates)) if reporter else nullcontext()
    with bar as b:
        for p, label, split in candidates:
            info = _inspect(p, label, split, max_pixels)
            files.append(info)
            if not has_image_extension(p) and info.error:
                info.error = f"not an image ({info.error})"
            elif not has_image_extension(p):  # an image under a name training skips: not counted, as in training
                info.ignored = True
                problems["ignored_extension"].append({
                    "path": str(p), "class": label, "split": split,
                    "reason": f"a {info.format} image that training ignores: {p.suffix or 'no extension'} is not "
                              f"an image extension (rename it to use it)"})
            if b is not None:
                b.advance()
    for h in sorted(hidden_dirs):
        problems["hidden"].append({"path": h, "reason": "hidden file or folder (never used as data)"})
    good = [f for f in files if f.error is None and not f.ignored]
    for f in files:
        if f.error:
            problems["unreadable"].append({"path": str(f.path), "class": f.label, "split": f.split, "reason": f.error})
    for f in good:
        if min(f.width, f.height) < min_size:
            problems["tiny"].append({"path": str(f.path), "size": [f.width, f.height],
                                     "reason": f"smaller than {min_size} px"})
        if f.exif_rotated:
            problems["exif_rotated"].append({"path": str(f.path), "reason": "EXIF orientation set (applied when loading)"})
        if f.frames > 1:
            problems["animated"].append({"path": str(f.path), "frames": f.frames, "reason": "animated (first frame used)"})
    families = Counter(_mode_family(f.mode) for f in good)
    if len(families) > 1:
        common = families.most_common(1)[0][0]
        for f in good:
            if _mode_family(f.mode) != common:
                problems["mixed_modes"].append({"path": str(f.path), "mode": f.mode,
                                                "reason": f"{f.mode} among mostly {common} images"})
    # class folders and counts
    classes = sorted({label for _, label, _, hidden in entries if label is not None and not hidden} |
                     {d.name for top in tops.values() for d in top.iterdir() if d.is_dir() and not is_hidden(d)})
    counts = {c: Counter() for c in classes}
    for f in good:
        counts[f.label][f.split] += 1
    for c in classes:
        if sum(counts[c].values()) == 0:
            problems["empty_classes"].append({"class": c, "reason": "no readable images"})
    totals = {c: sum(v.values()) for c, v in counts.items() if sum(v.values())}
    imbalance = round(max(totals.values()) / min(totals.values()), 3) if totals else None
    # duplicates: exact (same bytes) first, then near (perceptual hash) among the rest
    exact = _groups(good, lambda f: f.sha256)
    seen_exact = {id(f) for g in exact for f in g}
    near = [g for g in _near_groups(good, near_bits) if not all(id(f) in seen_exact for f in g)]
    for match, groups in (("exact", exact), ("near", near)):
        for g in groups:
            kind = ("leakage" if len({f.split for f in g}) > 1 else
                    "conflicting_labels" if len({f.label for f in g}) > 1 else "duplicates")
            problems[kind].append(_describe(g, match))
    report = AuditReport(root, layout, files, dict(problems), {c: dict(v) for c, v in counts.items()}, imbalance)
    return report


def quarantine(report: AuditReport, folder: Path | None = None) -> tuple[Path, list[tuple[Path, Path, str]]]:
    if report.layout == "label-csv":  # moving a file out would leave its row pointing at nothing
        raise UserError(f"--fix quarantine moves files out of class folders; for the label CSV {report.root}, "
                        f"remove the rows that audit.json lists instead")
    """Move the report's quarantine candidates into `folder` (default: DATA.quarantine beside
    the dataset), keeping their relative paths, and log each move in quarantine.csv."""
    folder = Path(folder) if folder else report.root.with_name(report.root.name + ".quarantine")
    if folder.resolve().is_relative_to(report.root.resolve()):
        raise DatasetError("the quarantine folder must be outside the dataset")
    moves = []
    for path, reason in sorted(report.quarantine_candidates().items()):
        if not path.exists():
            continue
        target = folder / path.relative_to(report.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.stem}.{os.getpid()}{target.suffix}")
        shutil.move(str(path), str(target))
        moves.append((path, target, reason))
    if moves:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "quarantine.csv"
        new = not log.exists()
        with open(log, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["original", "moved_to", "reason"])
            writer.writerows([(str(a), str(b), r) for a, b, r in moves])
    return folder, moves


def quick_audit(scanned) -> list[str]:
    """The cheap part of the audit, run before every training: exact duplicates by content hash
    (within a class, across classes, across splits) and class imbalance. One line per finding."""
    by_hash = defaultdict(list)
    for s in scanned.samples:
        try:
            by_hash[hashlib.sha1(s.path.read_bytes()).hexdigest()].append(s)
        except OSError:
            continue
    groups = [g for g in by_hash.values() if len(g) > 1]
    leak = [g for g in groups if len({s.split for s in g}) > 1]
    conflict = [g for g in groups if g not in leak and len({s.label for s in g}) > 1]
    dup = [g for g in groups if g not in leak and g not in conflict]
    lines = []
    if leak:
        lines.append(f"{len(leak)} image(s) appear in more than one split (train/test leakage), e.g. "
                     f"{', '.join(str(s.path) for s in leak[0])}")
    if conflict:
        lines.append(f"{len(conflict)} image(s) appear under more than one class (conflicting labels), e.g. "
                     f"{', '.join(str(s.path) for s in conflict[0])}")
    if dup:
        lines.append(f"{len(dup)} group(s) of exact duplicates within a class")
    counts = Counter(t for s in scanned.samples for t in scanned.tags(s))
    if counts and min(counts.values()) and max(counts.values()) / min(counts.values()) >= 10:
        lines.append(f"classes are imbalanced {max(counts.values()) / min(counts.values()):.0f}:1 "
                     f"({max(counts, key=counts.get)} vs {min(counts, key=counts.get)})")
    return lines
