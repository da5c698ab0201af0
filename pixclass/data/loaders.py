"""Batches of uint8 images for training and evaluation.

Every split is decoded and resized once, into the decoded-image cache's shards (the decode cost
is paid once per dataset, not every epoch). A split whose pixels fit in its share of
`max_memory_gb` is then held as one uint8 tensor; a larger one is read from the shards batch by
batch (data/rows_on_disk.py), so memory stays flat in the dataset's size. Augmentation runs on
whole batches of tensors. Only where the cache cannot be written does a large split stream
through DataLoader workers that decode every epoch. Either way a file that cannot be decoded is
reported and skipped, never a crash mid-epoch."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DatasetError, ImageDecodeError, first_line
from ..progress import Reporter
from .decode import decode_image, read_size
from .transforms import Preprocess, image_to_uint8


def label_tensor(labels: list) -> torch.Tensor:
    """Class indices -> int64 N; multi-label multi-hot rows -> float32 N x K (what
    BCEWithLogitsLoss takes)."""
    if labels and isinstance(labels[0], (list, tuple)):
        return torch.tensor(labels, dtype=torch.float32)
    return torch.tensor(labels, dtype=torch.long)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


class DecodedImages(Dataset):
    """path -> uint8 tensor at the preprocessing size, or None when the file is unusable."""

    def __init__(self, paths: list[Path], pre: Preprocess):
        self.paths, self.pre = list(paths), pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, image_to_uint8(decode_image(self.paths[i], self.pre.channels), self.pre), None
        except ImageDecodeError as e:
            return i, None, e.reason


def _keep_all(batch):
    return batch


class DecodeAhead:
    """Batches of DecodedImages items [(index, image or None, reason)], decoded by worker
    processes that start the moment this is made and run up to `max_bytes` of images ahead of the
    consumer, so decoding overlaps with whatever the main process does meanwhile (importing timm
    and building a pretrained model keep one core busy for seconds while the other would idle).
    Fewer than `min_files_for_workers` files are decoded in the consumer's process instead: not
    worth the workers."""

    def __init__(self, paths: list[Path], pre: Preprocess, batch_size: int = 32, max_bytes: int = 1 << 29,
                 workers: int | None = None, min_files_for_workers: int = 64):
        self.paths, self.pre, self.batch_size = list(paths), pre, batch_size
        self._batches = None
        if len(self.paths) < min_files_for_workers:
            workers = 0
        elif workers is None:
            workers = default_workers()
        if workers:
            per_batch = batch_size * pre.channels * pre.size * pre.size
            n_batches = -(-len(self.paths) // batch_size)
            ahead = max(2, min(n_batches, max_bytes // per_batch) // workers + 1)
            # its own generator: creating workers must not draw from (and so shift) the global RNG
            loader = DataLoader(DecodedImages(self.paths, pre), batch_size=batch_size, num_workers=workers,
                                collate_fn=_keep_all, prefetch_factor=ahead, generator=torch.Generator())
            self._batches = iter(loader)

    def __iter__(self):
        if self._batches is not None:
            yield from self._batches
            return
        dataset = DecodedImages(self.paths, self.pre)
        for start in range(0, len(dataset), self.batch_size):
            yield [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]

    def close(self) -> None:
        """Stop the workers (they may still be decoding files nobody needs any more)."""
        self._batches = None


def _decoded_items(paths: list[Path], pre: Preprocess, reporter: Reporter, what: str):
    """(index, uint8 image or None, reason) of every file in order, decoded by workers ahead of
    the caller, with a progress bar."""
    with reporter.bar(what, len(paths)) as bar:
        for chunk in DecodeAhead(paths, pre, batch_size=64, max_bytes=0, min_files_for_workers=512):
            yield from chunk
            bar.advance(len(chunk))


def decode_all(paths: list[Path], pre: Preprocess, reporter: Reporter, what: str = "decoding"):
    """Decode every file once. Returns (uint8 N x C x H x W of the good files, their indices,
    [(path, reason)] of the bad ones)."""
    n = len(paths)
    images = torch.empty((n, pre.channels, pre.size, pre.size), dtype=torch.uint8)
    good = torch.zeros(n, dtype=torch.bool)
    failures = []
    for i, img, reason in _decoded_items(paths, pre, reporter, what):
        if img is None:
            failures.append((paths[i], reason))
        else:
            images[i] = img
            good[i] = True
    idx = good.nonzero().flatten()
    # indexing copies: with every file good (the usual case) the tensor is already what is returned
    return (images if len(idx) == n else images[idx]), idx, failures


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The order of an epoch's rows: shuffled, or (with `sample_weights`, a weighted sampler)
    n rows drawn with replacement in proportion to their weights."""
    if shuffle and sample_weights is not None:
        return torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, skip: int = 0,
                  sample_weights: torch.Tensor | None = None):
    """Index tensors of successive batches. The order is drawn from `generator` first, so a
    resumed epoch can redraw the same order and `skip` the batches already done."""
    order = epoch_order(n, shuffle, generator, sample_weights)
    for start in range(skip * batch_size, n, batch_size):
        yield order[start:start + batch_size]


@dataclass
class SplitData:
    """One split kept in memory: inputs (uint8 images N x C x H x W, or cached features
    N x views x ...), labels int64 N (multi-label: float32 multi-hot N x K), and the file paths."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0,
                sample_weights: torch.Tensor | None = None):
        for idx in batch_indices(len(self), batch_size, shuffle, generator, skip, sample_weights):
            yield self.images[idx], self.labels[idx], idx


class StreamingSplit:
    """A split too large for memory where the decoded-image cache cannot be written: decoded by
    DataLoader workers every epoch."""

    def __init__(self, paths: list[Path], labels: list[int], pre: Preprocess):
        self.paths, self.labels_list, self.pre = list(paths), list(labels), pre
        self.labels = label_tensor(self.labels_list)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0,
                sample_weights: torch.Tensor | None = None):
        order = epoch_order(len(self), shuffle, generator, sample_weights)
        order = order[skip * batch_size:]
        ds = DecodedImages([self.paths[i] for i in order], self.pre)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=default_workers(), collate_fn=_keep_all,
                            persistent_workers=False, generator=torch.Generator())
        for chunk in loader:
            good = [(i, img) for i, img, _ in chunk if img is not None]
            if not good:
                continue
            idx = order[torch.tensor([i for i, _ in good])]
            yield torch.stack([img for _, img in good]), self.labels[idx], idx


# what one split's decoded images may take of data.max_memory_gb in memory (0.25 GB of the
# default 4: 80k images of 32 px, 1,700 of 224 px); a larger split is read from the decoded-image
# cache batch by batch (rows_on_disk.py), so what a run holds stays flat in the dataset's size:
# reading a batch's rows from the page cache costs milliseconds against seconds of training on it
IMAGE_SHARE = 1 / 16
# the cache's shards: written one at a time as decoding goes, so decoding holds one of them
SHARD_BYTES = 64 * 2**20
CONTENTS = "contents.json"  # written last: a folder without it was never finished


def _open_cached(folder: Path, paths: list[Path], reporter: Reporter, what: str):
    """(ImageRows of the good files, their indices, [(path, reason)] of the bad ones) from a
    finished cache folder; None when there is none or it is damaged (it is decoded again)."""
    import numpy as np

    from .rows_on_disk import ImageRows, safetensors_offsets
    if not (folder / CONTENTS).is_file():
        return None
    try:
        contents = json.loads((folder / CONTENTS).read_text())
        image_shape = tuple(contents["shape"])
        row_bytes = int(np.prod(image_shape))
        files, where, offsets = [], [], []
        for number, (name, count) in enumerate(contents["shards"]):
            starts, entries = safetensors_offsets(folder / name)
            if entries["images"] != ("U8", (count, *image_shape)):
                raise ValueError(f"shard {name} holds {entries['images']}")
            if (folder / name).stat().st_size < starts["images"] + count * row_bytes:
                raise ValueError(f"shard {name} is cut short")
            files.append(folder / name)
            where.append(np.full(count, number, np.int32))
            offsets.append(starts["images"] + np.arange(count, dtype=np.int64) * row_bytes)
        rows = ImageRows(files, np.concatenate(where) if where else np.zeros(0, np.int32),
                         np.concatenate(offsets) if offsets else np.zeros(0, np.int64), image_shape)
        if len(rows) != len(contents["index"]):
            raise ValueError(f"{len(rows)} images for {len(contents['index'])} files")
        failures = [(paths[i], reason) for i, reason in contents["failures"]]
    except Exception as e:  # damaged: decoded again
        reporter.warn(f"damaged decoded-image cache {folder} ({first_line(e)}); decoding again")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    reporter.info(f"{what}: {len(paths)} decoded images from the cache")
    return rows, torch.tensor(contents["index"], dtype=torch.long), failures


def _decode_into(folder: Path, paths: list[Path], pre: Preprocess, reporter: Reporter, what: str) -> None:
    """Decode every file into the cache folder's shards, a shard at a time; the folder appears
    whole or not at all (built under another name, then renamed)."""
    from safetensors.torch import save_file
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    image_shape = (pre.channels, pre.size, pre.size)
    shard = torch.empty((max(1, SHARD_BYTES // (pre.channels * pre.size * pre.size)), *image_shape),
                        dtype=torch.uint8)
    shards, good, failures, filled = [], [], [], 0

    def flush():
        name = f"{len(shards):05d}.safetensors"
        save_file({"images": shard[:filled].contiguous()}, str(tmp / name))
        shards.append((name, filled))

    try:
        for i, img, reason in _decoded_items(paths, pre, reporter, what):
            if img is None:
                failures.append((i, reason))
                continue
            shard[filled] = img
            filled += 1
            good.append(i)
            if filled == len(shard):
                flush()
                filled = 0
        if filled:
            flush()
        (tmp / CONTENTS).write_text(json.dumps({"shape": image_shape, "shards": shards, "index": good,
                                                "failures": failures}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same images first: theirs is used
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_decode(paths: list[Path], pre: Preprocess, reporter: Reporter, what: str, hold: bool):
    """(images, indices of the good files, [(path, reason)] of the bad ones), decoded once into an
    on-disk cache keyed by every file's content and the preprocessing: the second run on the same
    images skips decoding, and any changed file gives a new key. `hold`: the images as one uint8
    tensor in memory; else ImageRows that read them from the cache when indexed. None when they
    are not to be held and the cache cannot be written (the caller streams them instead)."""
    from ..cache import cache_root, digest, file_digest
    key = digest(pre.to_dict(), [file_digest(p) for p in paths])
    folder = cache_root() / "images" / key
    cached = _open_cached(folder, paths, reporter, what)
    if cached is None:
        try:
            _decode_into(folder, paths, pre, reporter, what)
        except OSError as e:  # a full or read-only disk costs the cache, not the run
            reporter.warn(f"could not write the decoded-image cache: {e}")
            return decode_all(paths, pre, reporter, what) if hold else None
        cached = _open_cached(folder, paths, Reporter(quiet=True), what)
        if cached is None:
            return decode_all(paths, pre, reporter, what) if hold else None
    rows, idx, failures = cached
    if hold:
        images = rows[:]
        rows.source.close()
        return images, idx, failures
    return rows, idx, failures


def load_split(paths: list[Path], labels: list[int], pre: Preprocess, reporter: Reporter,
               max_memory_gb: float = 4.0, what: str = "decoding"):
    """Returns (SplitData or StreamingSplit, failures). The images of a SplitData are held in memory
    up to IMAGE_SHARE of `max_memory_gb`, read from the decoded-image cache per batch above it."""
    nbytes = len(paths) * pre.channels * pre.size * pre.size
    limit = max_memory_gb * IMAGE_SHARE
    hold = nbytes <= limit * 2**30
    decoded = _cached_decode(paths, pre, reporter, what, hold)
    if decoded is None:
        reporter.info(f"{what}: {len(paths)} images are more than {limit:g} GB and the decoded-image cache "
                      f"cannot hold them; decoding them again every epoch")
        return StreamingSplit(paths, labels, pre), []
    images, idx, failures = decoded
    if not hold:
        reporter.info(f"{what}: {nbytes / 2**30:.2g} GB of decoded images, read from the cache per batch "
                      f"(more than {limit:g} GB, 1/{round(1 / IMAGE_SHARE)} of --max-memory {max_memory_gb:g})")
    kept = idx.tolist()
    return SplitData(images, label_tensor([labels[i] for i in kept]), [paths[i] for i in kept]), failures


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
    if len(images) == 0:
        raise DatasetError("no readable training images")
    c = images.shape[1]
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def typical_image_size(paths: list[Path], sample: int = 64) -> int:
    """A from-scratch training size suited to the data: the median short side of a sample of
    images, rounded to a multiple of 8 and kept in [32, 128] (small nets gain little above that
    and cost much more on a CPU)."""
    step = max(1, len(paths) // sample)
    sides = []
    for p in paths[::step][:sample]:
        try:
            sides.append(min(read_size(p)))
        except ImageDecodeError:
            continue
    if not sides:
        return 64
    sides.sort()
    median = sides[len(sides) // 2]
    return int(min(128, max(32, round(median / 8) * 8)))

