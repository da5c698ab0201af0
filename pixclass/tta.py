"""Test-time augmentation: the one place a network's outputs on several views of an image become
one set of probabilities.

The artifact names the augmentation its model is used with (`tta` in pixclass.json), and
everything that turns that model into probabilities (the inference backends, every export through
`inference.Probabilities`, explanation) calls `probabilities` here, so evaluate, predict, the
service and the exported files all answer the same way.

- "none": softmax of the network's output;
- "hflip": the mean of the softmax on the image and on its left-right mirror."""

from __future__ import annotations

import torch
from torch import nn

TTA_MODES = ("none", "hflip")


def probabilities(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Standardized N x C x H x W -> float32 probabilities N x K, averaged over the views `tta`
    names."""
    if tta == "none":
        return _softmax(model(x))
    if tta == "hflip":
        # both views in one batch: one pass through the network (and one copy of it in an exported
        # graph) rather than two
        probs = _softmax(model(torch.cat([x, x.flip(3)])))  # 2N x K: the images, then their mirrors
        return probs.reshape(2, -1, probs.shape[1]).mean(0)
    raise ValueError(f"unknown test-time augmentation {tta!r} (one of {', '.join(TTA_MODES)})")


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    # in float32 whatever the model's dtype, so a bf16 or fp16 model still gives probabilities that
    # sum to 1; a float32 model's graph (what exports trace) gets no cast at all
    return torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=1)
