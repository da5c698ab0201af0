"""Test-time augmentation: the one place a network's outputs on several views of an image become
one set of probabilities.

The artifact names the augmentation its model is used with (`tta` in pixclass.json), and
everything that turns that model into probabilities (the inference backends, every export through
`inference.Probabilities`, explanation) calls `probabilities` here, so evaluate, predict, the
service and the exported files all answer the same way.

- "none": softmax of the network's output;
- "hflip": the mean of the softmax on the image and on its left-right mirror.

A multi-label model (`multilabel=True`: one independent yes/no per label) takes the sigmoid of each
logit in place of the softmax over them, here too, so every backend and export agrees on that.

The artifact's calibration temperature (calibration.py) divides the logits of every view before
its softmax, here, so it travels into every export with the rest of the graph."""

from __future__ import annotations

import torch
from torch import nn

TTA_MODES = ("none", "hflip")


def probabilities(model: nn.Module, x: torch.Tensor, tta: str = "none", temperature: float = 1.0,
                  multilabel: bool = False) -> torch.Tensor:
    """Standardized N x C x H x W -> float32 probabilities N x K, averaged over the views `tta`
    names, each view's logits divided by `temperature` first."""
    if tta == "none":  # no views to stack: the exported graph is the network and its softmax
        return activation(_scaled(model(x), temperature), multilabel)
    return combine_views(view_logits(model, x, tta), temperature, multilabel)


def view_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Standardized N x C x H x W -> the network's logits on each view `tta` names, V x N x K."""
    if tta == "none":
        return model(x)[None]
    if tta == "hflip":
        # both views in one batch: one pass through the network (and one copy of it in an exported
        # graph) rather than two
        logits = model(torch.cat([x, x.flip(3)]))  # 2N x K: the images, then their mirrors
        return logits.reshape(2, -1, logits.shape[1])
    raise ValueError(f"unknown test-time augmentation {tta!r} (one of {', '.join(TTA_MODES)})")


def combine_views(logits: torch.Tensor, temperature: float = 1.0, multilabel: bool = False) -> torch.Tensor:
    """V x N x K logits -> N x K probabilities: the mean over the views of softmax(logits / T)
    (of the sigmoid for a multi-label model)."""
    return activation(_scaled(logits, temperature), multilabel).mean(0)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # an uncalibrated model's graph gets no extra operation
    return logits if temperature == 1.0 else logits / temperature


def activation(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Logits ... x K -> probabilities: the softmax over the K classes, or for a multi-label model
    the sigmoid of each (K independent answers)."""
    # in float32 whatever the model's dtype, so a bf16 or fp16 model still gives probabilities that
    # sum to 1; a float32 model's graph (what exports trace) gets no cast at all
    logits = logits if logits.dtype == torch.float32 else logits.float()
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)
