"""Entries of a dataset kept in safetensors files (decoded images, backbone features) and read at
their byte offsets when used, so a run holds the batch it works on, not the dataset.

Read, not memory-mapped: pages touched through a map count in the process's resident set until it
is unmapped, so an epoch over a mapped file would show all of it as resident; pages read stay in
the kernel's page cache, which it hands back under pressure."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch


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


class EntryFiles:
    """Files of fixed-size entries: `read` fills one buffer row per entry from (file number, byte
    offset) pairs. Descriptors stay open between reads (up to `max_open_files`). A file may also be
    an open file object (a scratch file its owner deletes): it is read through its own descriptor."""

    max_open_files = 256  # a large cache has hundreds of shards

    def __init__(self, files: list):
        self.files = list(files)
        self._fds: dict[int, int] = {}

    def read(self, where: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> None:
        """rows[k] <- the entry of file where[k] at offsets[k] (rows: uint8, one row per entry)."""
        for k in np.lexsort((offsets, where)):  # in file order: neighbouring entries read one after another
            i = int(where[k])
            n = os.preadv(self._fd(i), [rows[k]], int(offsets[k]))
            if n != rows[k].nbytes:  # the file changed under the run (a cache cleared meanwhile)
                raise OSError(f"cache file {self.files[i]} ended early (read {n} of {rows[k].nbytes} bytes "
                              f"at {int(offsets[k])})")

    def _fd(self, i: int) -> int:
        source = self.files[i]
        if hasattr(source, "fileno"):
            return source.fileno()
        if i not in self._fds:
            if len(self._fds) >= self.max_open_files:
                self.close()
            self._fds[i] = os.open(source, os.O_RDONLY)
        return self._fds[i]

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self):  # descriptors do not travel to another process: it opens its own
        return {"files": self.files, "_fds": {}}

    def __del__(self):
        self.close()


class ImageRows:
    """uint8 images (N x C x H x W) that live in files: indexing (an index tensor, array, list or
    slice) reads those images into a new tensor, as indexing the held tensor would give them."""

    dtype = torch.uint8

    def __init__(self, files: list[Path], where: np.ndarray, offsets: np.ndarray, image_shape: tuple):
        self.source = EntryFiles(files)
        self.where, self.offsets, self.image_shape = where, offsets, tuple(image_shape)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def shape(self) -> tuple:  # what channel_stats reads of a held tensor
        return (len(self), *self.image_shape)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            rows = np.arange(len(self))[key]
        else:
            rows = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
            if rows.ndim == 0:
                return self[rows.reshape(1)][0]
        out = torch.empty((len(rows), *self.image_shape), dtype=self.dtype)
        if len(rows):
            self.source.read(self.where[rows], self.offsets[rows], out.view(len(rows), -1).numpy())
        return out
