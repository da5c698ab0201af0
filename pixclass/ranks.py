"""Which process of a torchrun launch this is, for the commands that split a list of files
across processes (predict). Training has its own DDP set-up (train/distributed.py); a consumer of
a model must not import training code, so what reads torchrun's environment lives here, and
training's Dist extends it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of n items (sizes differing by at most one)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def from_env() -> Ranks:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_WORLD_SIZE; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


@contextmanager
def process_group(ranks: Ranks):
    """A gloo process group (CPU; only barriers pass through it) for the duration, when launched by torchrun."""
    opened = ranks.enabled and not torch.distributed.is_initialized()
    if opened:
        torch.distributed.init_process_group(backend="gloo")
    try:
        yield ranks
    finally:
        if opened:
            torch.distributed.destroy_process_group()
