"""The "unknown" score that works where the classifier's confidence does not: how close an image's
features are to the training images' (deep nearest neighbours, Sun et al. 2022, "Out-of-
distribution detection with deep nearest neighbors").

The features are the input of the network's classifier layer (its penultimate layer: for a
transfer model, the pretrained backbone's pooled features), L2-normalized. A run keeps a bank of
them for a seeded subset of its training images (float16 in the artifact's safetensors file) and
the score of an image is its cosine similarity to the nearest one, averaged over the test-time
views. `Scores` computes it in the same graph as the probabilities, so ONNX exports answer it as a
second output.

The classifier layer is found by structure, not by family: timm's `get_classifier()`, else a
`head` module (pixclass's transfer and airbench networks), else the last Linear layer (the
classic CNN). Its input is read with a forward pre-hook held only while the network runs."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import batch_to_input
from .tta import combine_views, view_logits

BANK_KEY = "pixclass.abstain.feature_bank"  # the bank's name in model.safetensors (not a weight)
DEFAULT_BANK_SIZE = 4096  # training images kept in the bank at most


def classifier_layer(model: nn.Module) -> nn.Module:
    """The module whose input is the network's penultimate features."""
    get = getattr(model, "get_classifier", None)
    if callable(get) and isinstance(get(), nn.Module) and not isinstance(get(), nn.Identity):
        return get()
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no classifier layer to read features from")
    return linear[-1]


@contextmanager
def tapped(model: nn.Module):
    """While inside: `captured[0]` is the input of the classifier layer on the last forward pass."""
    captured = [None]
    handle = classifier_layer(model).register_forward_pre_hook(lambda module, args: captured.__setitem__(0, args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def views_and_features(model: nn.Module, x: torch.Tensor, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized N x C x H x W -> (logits V x N x K, L2-normalized features V x N x D), one pass."""
    return logits_and_features(model, lambda: view_logits(model, x, tta))


def logits_and_features(model: nn.Module, forward) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits V x N x K, L2-normalized features V x N x D) of `forward()`, a pass that runs
    `model`'s classifier layer once on the V x N rows in view-major order and returns their logits."""
    with tapped(model) as captured:
        logits = forward()
    features = captured[0].float().flatten(1)
    return logits, F.normalize(features, dim=1).reshape(logits.shape[0], logits.shape[1], -1)


def nearest_similarity(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Normalized features V x N x D, bank M x D -> N: cosine similarity to the nearest bank row,
    averaged over the views. One expression, so that an export traces it for any batch size."""
    return (features @ bank.T).max(dim=-1).values.mean(0)


def nearest_similarity_in_chunks(features: torch.Tensor, bank: torch.Tensor, max_elements: int = 2**24) -> torch.Tensor:
    """nearest_similarity of a whole split, its V x rows x M similarities formed `max_elements` at
    a time (64 MB of float32): at once they would be 1 GB for 30,000 validation images, two views
    and a full bank, the largest allocation of a whole run."""
    rows = max(1, max_elements // max(1, features.shape[0] * len(bank)))
    parts = [nearest_similarity(features[:, start:start + rows], bank) for start in range(0, features.shape[1], rows)]
    return torch.cat(parts) if parts else features.new_zeros(0)


class Scores(nn.Module):
    """model -> (probabilities N x K, similarity N) with the artifact's test-time augmentation and
    temperature: inference.Probabilities for a model with a feature bank."""

    def __init__(self, model: nn.Module, bank: torch.Tensor, tta: str = "none", temperature: float = 1.0,
                 multilabel: bool = False):
        super().__init__()
        self.model, self.tta, self.temperature, self.multilabel = model, tta, temperature, multilabel
        self.register_buffer("bank", bank.float(), persistent=False)

    def forward(self, x):
        logits, features = views_and_features(self.model, x, self.tta)
        return combine_views(logits, self.temperature, self.multilabel), nearest_similarity(features, self.bank)


def bank_indices(n: int, size: int = DEFAULT_BANK_SIZE, seed: int = 0) -> np.ndarray:
    """Which of `n` training images go into the bank: all, or a seeded sample of `size`, sorted."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


@torch.inference_mode()
def features_of_batches(model: nn.Module, preprocess, batches, tta: str = "none"):
    """(logits V x N x K, normalized features V x N x D, labels N) of the images `batches` yields
    as (uint8 images, labels, indices)."""
    model = model.eval()
    device = next(model.parameters()).device
    return scores_of_batches(batches, lambda images: views_and_features(
        model, batch_to_input(images.to(device), preprocess), tta))


@torch.inference_mode()
def scores_of_batches(batches, scores_of):
    """(logits V x N x K, features V x N x D, labels N) over `batches` of (inputs, labels, indices),
    `scores_of(inputs)` giving one batch's (logits, features)."""
    logits, features, labels = [], [], []
    for inputs, y, _ in batches:
        z, f = scores_of(inputs)
        logits.append(z.float().cpu())
        features.append(f.cpu())
        labels.append(y)
    if not logits:
        return torch.zeros(1, 0, 0), torch.zeros(1, 0, 0), np.zeros(0, np.int64)
    return torch.cat(logits, 1), torch.cat(features, 1), torch.cat(labels).numpy()


def bank_of(features: torch.Tensor) -> torch.Tensor:
    """Training images' normalized features V x N x D -> the bank, N x D float16 (the first view:
    the image itself, as it was trained on)."""
    return features[0].half()
