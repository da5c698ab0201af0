"""Several processes, GPUs or machines through PyTorch's DistributedDataParallel, launched with
torchrun (or `pixclass train --nproc N`). Every rank sees the same shuffled global batch and
trains on its own slice of it; DDP averages the gradients, and the loss is scaled so that the
average equals the single-process gradient of the whole batch. Only rank 0 writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's slice of a global batch of n (contiguous, sizes differing by at most one)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def choose_device(requested: str | None = None, dist: Dist | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless one is asked for. Under torchrun each process takes the
    GPU of its local rank."""
    from ..errors import UserError
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if device.type == "mps" and not mps:
            raise UserError(f"--device {requested}: Apple's MPS is not available here")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) here")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif mps:
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count() if dist and dist.enabled else 0)
    return device


def init(dist: Dist, device: torch.device) -> None:
    """The process group: nccl between GPUs, gloo on CPUs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
