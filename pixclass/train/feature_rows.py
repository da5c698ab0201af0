"""A split of cached features (N images x V views of one entry shape) that lives in files and is
read batch by batch, so training holds a batch of features, not the dataset's.

The entries sit in the feature cache's safetensors shards, or in a scratch file of rows (the
pooled features the head trains on). A batch's entries are read at their offsets straight into
the batch's tensor and converted to float32 per batch. Read, not memory-mapped: pages touched
through a map count in the process's resident set until it is unmapped, so an epoch over a mapped
cache would show the whole cache as resident; pages read stay in the kernel's page cache, which
it hands back under pressure. Where a split fits in what the run may hold (memory_plan.py) it is
loaded once and indexed in memory instead, as fast as before."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..data.loaders import batch_indices

SAFETENSORS_DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def safetensors_offsets(path: Path) -> tuple[dict[str, int], dict[str, tuple]]:
    """{key: byte offset of its data in the file}, {key: (dtype name, shape)}, from the header
    the safetensors format puts first (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    return ({k: start + v["data_offsets"][0] for k, v in header.items()},
            {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})


class FeatureRows:
    """Features of one split: `files[where[i, v]]` holds image i's view v at `offsets[i, v]`.
    Quacks like SplitData for the trainer: len, labels, paths, batches()."""

    max_open_files = 256  # descriptors kept open between batches (a large cache has hundreds of shards)

    def __init__(self, files: list, where: np.ndarray, offsets: np.ndarray, shape: tuple, dtype: torch.dtype,
                 labels: torch.Tensor, paths: list):
        self.files, self.where, self.offsets = list(files), where, offsets
        self.shape, self.dtype = tuple(shape), dtype
        self.labels, self.paths = labels, list(paths)
        self.held: torch.Tensor | None = None
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def views(self) -> int:
        return self.where.shape[1] if self.where.ndim == 2 else 0

    @property
    def nbytes(self) -> int:
        """What the split takes held in memory."""
        return len(self) * self.views * int(np.prod(self.shape)) * self.dtype.itemsize

    def hold(self) -> "FeatureRows":
        """Load every row into memory once (in the stored dtype); batches then index it."""
        if self.held is None:
            self.held = self._read(torch.arange(len(self)))
            self.close()
        return self

    def tensor(self) -> torch.Tensor:
        """Every row, float32 (N x V x ...)."""
        return (self.held if self.held is not None else self._read(torch.arange(len(self)))).float()

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0,
                sample_weights: torch.Tensor | None = None):
        for idx in batch_indices(len(self), batch_size, shuffle, generator, skip, sample_weights):
            rows = self.held[idx] if self.held is not None else self._read(idx)
            yield rows.float(), self.labels[idx], idx

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.numpy()
        out = torch.empty((len(rows), self.views, *self.shape), dtype=self.dtype)
        if out.numel() == 0:
            return out
        flat = out.view(len(rows) * self.views, -1).view(torch.uint8).numpy()
        files, offsets = self.where[rows].ravel(), self.offsets[rows].ravel()
        for k in np.lexsort((offsets, files)):  # in file order: neighbouring entries read one after another
            _read_exactly(self._fd(int(files[k])), flat[k], int(offsets[k]), self.files[int(files[k])])
        return out

    def _fd(self, i: int) -> int:
        if i not in self._fds:
            if len(self._fds) >= self.max_open_files:
                self.close()
            source = self.files[i]
            if hasattr(source, "fileno"):  # a scratch file this split owns: read through its own descriptor
                return source.fileno()
            self._fds[i] = os.open(source, os.O_RDONLY)
        return self._fds[i]

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


def _read_exactly(fd: int, buffer: np.ndarray, offset: int, name) -> None:
    n = os.preadv(fd, [buffer], offset)
    if n != buffer.nbytes:  # the file changed under the run (a cache cleared meanwhile)
        raise OSError(f"feature file {name} ended early (read {n} of {buffer.nbytes} bytes at {offset})")


def rows_from_batches(batches, labels: torch.Tensor, paths: list, hold: bool, scratch_dir: Path) -> FeatureRows:
    """A FeatureRows of the batches (N_b x V x ... tensors, in row order): held in memory, or
    written to an unnamed scratch file (deleted when the split is) and read back per batch."""
    parts, scratch, shape, dtype, n, views = [], None, None, None, 0, 0
    for b in batches:
        shape, dtype, views = tuple(b.shape[2:]), b.dtype, b.shape[1]
        if hold:  # a copy of a view: the view would keep the whole tensor it looks into alive
            parts.append(b.clone() if b._base is not None else b)
        else:
            if scratch is None:
                scratch_dir.mkdir(parents=True, exist_ok=True)
                scratch = tempfile.TemporaryFile(dir=scratch_dir)
            scratch.write(b.contiguous().view(torch.uint8).numpy())
        n += len(b)
    if shape is None:
        return FeatureRows([], np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int64), (), torch.float32, labels, paths)
    entry = int(np.prod(shape)) * dtype.itemsize
    offsets = (np.arange(n * views, dtype=np.int64) * entry).reshape(n, views)
    rows = FeatureRows([scratch] if scratch is not None else [], np.zeros((n, views), np.int32), offsets, shape,
                       dtype, labels, paths)
    if hold:
        rows.held = torch.cat(parts)
    else:
        scratch.flush()
    return rows
