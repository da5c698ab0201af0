"""A saved model's probabilities for image files together with its backbone's embedding of each
(the pooled vector its head reads), in one pass: what `suggest` ranks by and `add-class` builds
prototypes from. The embedding is captured as the frozen part (the model family says which) runs
inside the artifact's own probability network, test-time augmentation included, so the
probabilities are those `predict` gives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.loaders import DecodeAhead
from .data.transforms import batch_to_input
from .inference import Probabilities
from .models.registry import family_of


@dataclass
class Embedded:
    paths: list[Path]  # the files that decoded, in the order given
    probabilities: np.ndarray  # N x classes
    embeddings: np.ndarray | None  # N x D, None for a network without a pretrained backbone
    failures: list  # (path, reason) of the files that could not be read


def backbone_of(art):
    """The part of the artifact's network whose output is an image's embedding, or None."""
    return family_of(art.arch).frozen_part(art.model)


@torch.inference_mode()
def embed_files(art, paths: list[Path], batch_size: int = 32) -> Embedded:
    backbone = backbone_of(art)
    network = Probabilities.of(art)  # its test-time augmentation and calibration temperature
    seen: list[torch.Tensor] = []
    # the first call per batch sees the images as given (a test-time augmentation's mirrored
    # view comes after)
    hook = backbone.register_forward_hook(lambda m, i, out: seen.append(out)) if backbone is not None else None
    kept, probs, embeddings, failures = [], [], [], []
    try:
        for chunk in DecodeAhead(paths, art.preprocess, batch_size=batch_size):
            failures += [(paths[i], reason) for i, img, reason in chunk if img is None]
            good = [(i, img) for i, img, _ in chunk if img is not None]
            if not good:
                continue
            seen.clear()
            probs.append(network(batch_to_input(torch.stack([img for _, img in good]), art.preprocess)).numpy())
            if seen:
                embeddings.append(seen[0].flatten(1).numpy())
            kept += [paths[i] for i, _ in good]
    finally:
        if hook is not None:
            hook.remove()
    n_classes = len(art.classes)
    return Embedded(kept, np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
                    np.concatenate(embeddings) if embeddings and backbone is not None else None, failures)
