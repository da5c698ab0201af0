"""What a run may hold in memory: the ceiling (data.max_memory_gb, `--max-memory`) and what of it
goes to cached features. Features that fit in their share are loaded once and indexed in memory;
larger ones are read from the cache's files batch by batch (feature_rows.py), so what a run holds
does not grow with the dataset, only the reads do."""

from __future__ import annotations

GB = 2**30

# what features may take of the ceiling: the rest is for the process itself (torch, the model and
# its optimizer state), a batch's activations and the images decoded ahead for the backbone
FEATURE_SHARE = 0.5


class MemoryPlan:
    def __init__(self, max_memory_gb: float):
        self.ceiling_gb = max_memory_gb
        self.left = int(max_memory_gb * FEATURE_SHARE * GB)
        self.decisions: list[tuple[str, int, bool]] = []

    def hold(self, what: str, nbytes: int) -> bool:
        """Whether `nbytes` of `what` may be held in memory (taken from what is left if so)."""
        held = nbytes <= self.left
        if held:
            self.left -= nbytes
        self.decisions.append((what, nbytes, held))
        return held

    def line(self) -> str:
        """One line for the log, e.g. "memory: features read from disk per batch (7.8 GB float16);
        pooled features held (0.6 GB); at most 2 GB of features held (ceiling 4 GB, --max-memory)"."""
        parts = [f"{what} {'held in memory' if held else 'read from disk per batch'} ({nbytes / GB:.2g} GB)"
                 for what, nbytes, held in self.decisions]
        return (f"memory: {'; '.join(parts)}; at most {self.ceiling_gb * FEATURE_SHARE:g} GB of features held "
                f"(ceiling {self.ceiling_gb:g} GB, --max-memory)")
