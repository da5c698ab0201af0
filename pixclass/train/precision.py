"""Which floating-point precision to compute in. On a CPU, bfloat16 autocast only where the CPU has
it natively (AVX-512 BF16 or AMX); elsewhere it is about 13x slower than float32 here. On GPUs,
mixed precision: bfloat16 where supported, else float16 with loss scaling."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> torch.dtype | None:
    """"auto" | "fp32" | "bf16" -> the autocast dtype (None: plain float32)."""
    if precision == "bf16" or (precision == "auto" and cpu_has_bf16()):
        return torch.bfloat16
    return None


def training_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the standard training loop (None: float32). "auto" is mixed precision
    on GPUs and float32 on a CPU (bit-for-bit reproducible, and what the from-scratch benchmarks
    measure); "bf16"/"fp16" ask for it anywhere the device supports it."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16 if precision in ("auto", "fp16") else torch.bfloat16
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        from ..errors import UserError
        raise UserError("--precision fp16 needs a GPU; on a CPU use bf16 or fp32")
    return None
