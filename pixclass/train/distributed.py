"""Several processes, GPUs or machines through PyTorch's DistributedDataParallel, launched with
torchrun (or `pixclass train --nproc N`). Every rank sees the same shuffled global batch and
trains on its own slice of it; DDP averages the gradients, and the loss is scaled so that the
average equals the single-process gradient of the whole batch. Only rank 0 writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..ranks import Ranks
from ..ranks import from_env as ranks_from_env


@dataclass(frozen=True)
class Dist(Ranks):
    """A torchrun rank (ranks.Ranks: rank, world, local world, shard, barrier) with what training
    adds: the device index on its machine and sums over the ranks."""
    local_rank: int = 0

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def from_env() -> Dist:
    ranks = ranks_from_env()
    return Dist(ranks.rank, ranks.world, ranks.local_world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


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
