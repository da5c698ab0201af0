"""Keeping glibc's malloc from holding memory nobody uses.

glibc serves large blocks from mmap (returned to the system when freed) and small ones from its
heaps. After a large mmapped block is freed it raises that boundary to the block's size (its
"dynamic mmap threshold", up to 32 MB), so later image batches are carved from the heaps instead.
A loop that makes and drops such batches while keeping small results for a while (the backbone
features: a 19 MB float batch in, 31 KB of float16 per image kept until a shard is written)
scatters the small results through the batches' holes; the next batch fits no hole, the heap
grows, and a features pass over 50,000 images left 9 GB resident and 30 GB of address space (so
much that forking a DataLoader worker failed with ENOMEM). No library exposes mallopt or
malloc_trim (psutil and resource only read memory), hence these ctypes wrappers. Elsewhere than
glibc (macOS, musl) they do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
# the ceiling the dynamic threshold climbs to on its own (glibc's DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit); training with it fixed there runs as fast as with the dynamic one (bench/RESULTS.md)
_DYNAMIC_CEILING = 32 * 2**20


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # both glibc's
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the free pages of every malloc heap back to the system (a few milliseconds)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def large_blocks_mapped(threshold: int = 2**20):
    """Within: blocks of `threshold` bytes or more come from mmap, so each image batch goes back
    to the system when it is freed and the heaps hold only small things. Not around a network run
    by PyTorch: its activations of a few MB would then be mapped and faulted in afresh at every
    layer (calibration at 224 px ran at a fraction of its speed, most of it system time). glibc
    cannot be put back to its dynamic threshold, so on leaving the threshold is fixed where the
    dynamic one ends up."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_CEILING)
        libc.malloc_trim(0)
