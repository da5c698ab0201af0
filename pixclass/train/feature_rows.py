"""A split of cached features (N images x V views of one entry shape) that lives in files and is
read batch by batch, so training holds a batch of features, not the dataset's.

The entries sit in the feature cache's safetensors shards, or in a scratch file of rows (the
pooled features the head trains on). A batch's entries are read at their offsets straight into
the batch's tensor (data/rows_on_disk.py: read, not memory-mapped, and why) and converted to
float32 per batch. Where a split fits in what the run may hold (memory_plan.py) it is
loaded once and indexed in memory instead, as fast as before."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..data.loaders import batch_indices
from ..data.rows_on_disk import EntryFiles

SAFETENSORS_DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


class FeatureRows:
    """Features of one split: `files[where[i, v]]` holds image i's view v at `offsets[i, v]`.
    Quacks like SplitData for the trainer: len, labels, paths, batches()."""

    def __init__(self, files: list, where: np.ndarray, offsets: np.ndarray, shape: tuple, dtype: torch.dtype,
                 labels: torch.Tensor, paths: list):
        self.files, self.where, self.offsets = list(files), where, offsets
        self.shape, self.dtype = tuple(shape), dtype
        self.labels, self.paths = labels, list(paths)
        self.held: torch.Tensor | None = None
        self.source = EntryFiles(self.files)

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

    def subset(self, indices: np.ndarray) -> "FeatureRows":
        """The rows at `indices`, in that order: the same files (or held rows), not a copy."""
        idx = np.asarray(indices, dtype=np.int64)
        where, offsets = (self.where[idx], self.offsets[idx]) if self.where.ndim == 2 else (self.where, self.offsets)
        rows = FeatureRows(self.files, where, offsets, self.shape, self.dtype, self.labels[torch.from_numpy(idx)],
                           [self.paths[i] for i in idx])
        if self.held is not None:
            rows.held = self.held[torch.from_numpy(idx)]
        return rows

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
        self.source.read(self.where[rows].ravel(), self.offsets[rows].ravel(), flat)
        return out

    def close(self) -> None:
        self.source.close()


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
