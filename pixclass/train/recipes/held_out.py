"""The held-out probabilities a recipe hands back, computed from decoded images through the
inference backend (so they are what `pixclass evaluate` would compute on the saved model)."""

from __future__ import annotations

from ...inference import TorchBackend, predict_batches
from . import HeldOut, held_out_split


def held_out_on_images(model, data, splits: dict | None = None, batch_size: int = 64,
                       tta: str = "none") -> HeldOut | None:
    """`splits`: decoded splits by name (default: the data's own). `tta`: the test-time
    augmentation the recipe's FitResult names."""
    name, split = held_out_split(splits or {"val": data.val, "test": data.test})
    if split is None:
        return None
    backend = TorchBackend(model, data.classes, data.preprocess, tta)
    probs, labels, _ = predict_batches(backend, split.batches(batch_size))
    return HeldOut(name, probs, labels, list(getattr(split, "paths", [])))
