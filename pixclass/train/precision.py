"""Which floating-point precision the CPU should compute in: bfloat16 autocast only where the CPU
has it natively (AVX-512 BF16 or AMX); elsewhere it is about 13x slower than float32 here."""

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
