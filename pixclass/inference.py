"""Run a model over batches of uint8 images and collect probabilities; shared by validation during
training, evaluation and prediction so they can never disagree."""

from __future__ import annotations

import numpy as np
import torch

from .data.transforms import Preprocess, batch_to_input


@torch.inference_mode()
def predict_batches(model: torch.nn.Module, batches, pre: Preprocess):
    """batches yields (uint8 images, labels, indices). Returns (probs N x K, labels N, indices N)."""
    model.eval()
    probs, labels, indices = [], [], []
    for images, y, idx in batches:
        logits = model(batch_to_input(images, pre))
        probs.append(torch.softmax(logits.float(), dim=1))
        labels.append(y)
        indices.append(idx)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()
