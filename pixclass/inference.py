"""Placeholder of the backends API (replaced by the inference-backend branch on merge)."""

from __future__ import annotations

import numpy as np
import torch

from .data.transforms import batch_to_input


def softmax_probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


class TorchBackend:
    name = "torch"

    def __init__(self, model, classes, preprocess):
        self.model, self.classes, self.preprocess = model.eval(), list(classes), preprocess

    def probabilities_uint8(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return softmax_probabilities(self.model(batch_to_input(batch, self.preprocess)))


def predict_batches(backend, batches):
    probs, labels, indices = [], [], []
    for images, y, idx in batches:
        probs.append(backend.probabilities_uint8(images))
        labels.append(np.asarray(y))
        indices.append(np.asarray(idx))
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(indices)
