"""Standard datasets by name ("torchvision:cifar10"), made once into class folders in the cache.

torchvision reads each dataset's own files (downloaded once when online, or a copy the user
gives with --archive); pixclass then writes every image as a PNG under
CACHE/datasets/NAME/{train,test}/CLASS/, so that from there on a named dataset is an ordinary
split-folder dataset: the same scan, split, audit, report and evaluation as any folder.

torchvision checks the files it reads against the checksums of the official downloads. A copy
given with --archive that is not byte-identical to the official file (a subset, a re-packed
archive) is read without those checksums, with a warning: the user vouches for their own file."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import socket
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_line

PREFIX = "torchvision:"
_DONE = ".complete"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    torchvision_class: str
    split_argument: str  # "train" (train=True/False) or "split" (split="train"/"test")
    official_files: str  # what --archive takes, for the error message
    classes: tuple[str, ...] = ()  # for datasets whose torchvision class has no .classes


NAMED = {d.name: d for d in (
    NamedDataset("cifar10", "CIFAR10", "train", "cifar-10-python.tar.gz"),
    NamedDataset("cifar100", "CIFAR100", "train", "cifar-100-python.tar.gz"),
    NamedDataset("mnist", "MNIST", "train", "an archive or folder of the four MNIST .gz files"),
    NamedDataset("fashion-mnist", "FashionMNIST", "train", "an archive or folder of the four Fashion-MNIST .gz files"),
    NamedDataset("kmnist", "KMNIST", "train", "an archive or folder of the four KMNIST .gz files"),
    NamedDataset("svhn", "SVHN", "split", "an archive or folder with train_32x32.mat and test_32x32.mat",
                 classes=tuple(str(d) for d in range(10))),
)}


def is_named(text) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def lookup(text: str) -> NamedDataset:
    name = text[len(PREFIX):].strip().lower()
    if name not in NAMED:
        raise UserError(f"unknown dataset {text!r}; known: {', '.join(PREFIX + n for n in NAMED)}")
    return NAMED[name]


def folder_of(text: str) -> Path:
    """Where the named dataset's class folders are (or will be) in the cache."""
    from ..cache import cache_root
    return cache_root() / "datasets" / lookup(text).name


def ensure(text: str, archive: Path | None = None, reporter=None) -> Path:
    """The class-folder copy of the named dataset, made now if the cache lacks it: from `archive`
    when given, else downloaded by torchvision. A download that fails is one error line."""
    dataset = lookup(text)
    folder = folder_of(text)
    if (folder / _DONE).is_file() and archive is None:
        return folder
    work = folder.parent / f"{dataset.name}.download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if archive is not None:
            _unpack(Path(archive).expanduser(), dataset, work)
            splits = _read_given(dataset, work, reporter)
        else:
            splits = _download(dataset, work, text, reporter)
        _write_class_folders(dataset, splits, folder, reporter)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _torchvision_class(dataset: NamedDataset, verified: bool):
    import torchvision.datasets as tvd
    cls = getattr(tvd, dataset.torchvision_class)
    if verified:
        return cls
    # the same reader with no checksum to compare against (check_integrity then only checks that
    # the file exists): for a user's own copy that is not the official file
    attrs = {}
    for key in ("train_list", "test_list"):
        if hasattr(cls, key):
            attrs[key] = [[name, None] for name, _ in getattr(cls, key)]
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):
        attrs["split_list"] = {k: [url, name, None] for k, (url, name, _) in cls.split_list.items()}
    return type(f"Unverified{cls.__name__}", (cls,), attrs)


def _open(cls, dataset: NamedDataset, root: Path, split: str, download: bool):
    if dataset.split_argument == "train":
        return cls(str(root), train=split == "train", download=download)
    return cls(str(root), split=split, download=download)


def _download(dataset: NamedDataset, root: Path, text: str, reporter) -> dict:
    if reporter:
        reporter.info(f"{text}: downloading with torchvision into {root}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an offline machine should fail in seconds, not hang
    try:
        cls = _torchvision_class(dataset, verified=True)
        return {split: _open(cls, dataset, root, split, download=True) for split in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - urllib, http and torchvision's own errors alike: all mean "no copy"
        raise UserError(f"{text} is not in the cache and could not be downloaded ({first_line(e)}); "
                        f"give a copy with --archive FILE ({dataset.official_files})") from None
    finally:
        socket.setdefaulttimeout(previous)


def _read_given(dataset: NamedDataset, root: Path, reporter) -> dict:
    """The dataset read from an unpacked archive: checked against torchvision's checksums where it
    is the official file, read as it is (with a warning) where it is not."""
    try:
        cls = _torchvision_class(dataset, verified=True)
        return {split: _open(cls, dataset, root, split, download=False) for split in ("train", "test")}
    except RuntimeError:
        pass
    try:
        cls = _torchvision_class(dataset, verified=False)
        splits = {split: _open(cls, dataset, root, split, download=False) for split in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - a damaged or wrong archive fails in the reader's own ways
        raise UserError(f"the archive does not hold {PREFIX}{dataset.name} as torchvision reads it "
                        f"({first_line(e)}); expected {dataset.official_files}") from None
    if reporter:
        reporter.warn(f"the archive is not the official {PREFIX}{dataset.name} file: read without its checksums")
    return splits


def _unpack(archive: Path, dataset: NamedDataset, root: Path) -> None:
    """Put the archive's files where torchvision's reader looks: a .tar(.gz) or .zip unpacked
    (no path may leave the folder), a folder's files copied; the MNIST family's files go to
    ROOT/CLASS/raw, un-gzipped."""
    if not archive.exists():
        raise UserError(f"--archive: no such file or folder: {archive}")
    target = root
    if dataset.split_argument == "train" and dataset.torchvision_class.endswith("MNIST"):
        target = root / dataset.torchvision_class / "raw"
        target.mkdir(parents=True)
    try:
        if archive.is_dir():
            for p in archive.rglob("*"):
                if p.is_file():
                    shutil.copy2(p, target / p.name)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        else:
            shutil.copy2(archive, target / archive.name)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise UserError(f"--archive: cannot unpack {archive} ({first_line(e)})") from None
    if target is not root:  # the MNIST readers want the idx files flat and un-gzipped
        for p in list(target.rglob("*")):
            if p.is_file() and p.parent != target:
                p.rename(target / p.name)
        for p in list(target.glob("*.gz")):
            with gzip.open(p) as src, open(p.with_suffix(""), "wb") as dst:
                shutil.copyfileobj(src, dst)


def _class_names(dataset: NamedDataset, split) -> list[str]:
    names = list(dataset.classes or split.classes)
    # a class name becomes a folder name: no path separator ("T-shirt/top" in Fashion-MNIST)
    safe = [name.replace("/", "-").replace("\0", "").strip() or str(i) for i, name in enumerate(names)]
    if len(set(safe)) != len(safe):
        safe = [f"{i:03d}-{name}" for i, name in enumerate(safe)]
    return safe


def _write_class_folders(dataset: NamedDataset, splits: dict, folder: Path, reporter) -> None:
    """Every image as a PNG under FOLDER/{train,test}/CLASS/, written beside the final place and
    renamed into it, so that an interrupted run leaves no half dataset behind."""
    from ..progress import Reporter
    reporter = reporter or Reporter(quiet=True)
    names = _class_names(dataset, splits["train"])
    partial = folder.parent / f"{dataset.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for split, data in splits.items():
        for name in names:
            (partial / split / name).mkdir(parents=True, exist_ok=True)
        with reporter.bar(f"writing {PREFIX}{dataset.name} {split} images", total=len(data)) as bar:
            for i in range(len(data)):
                image, label = data[i]
                image.save(partial / split / names[int(label)] / f"{i:06d}.png")
                bar.advance()
    (partial / _DONE).write_text(hashlib.sha256(",".join(names).encode()).hexdigest() + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
