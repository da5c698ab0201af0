"""Predict classes for image files with a saved model. Imports only the artifact, decoding and
preprocessing: never the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import artifact as artifact_io
from .data.decode import decode_image
from .data.scan import IMAGE_EXTENSIONS, is_hidden
from .data.transforms import image_to_uint8
from .errors import ImageDecodeError, UserError
from .inference import predict_batches


def collect_image_paths(inputs) -> list[Path]:
    """Files as given, folders searched recursively for image files (hidden entries skipped)."""
    found = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(is_hidden(Path(part)) for part in f.relative_to(p).parts))
        elif p.exists():
            found.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return found


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


class Predictor:
    def __init__(self, art: artifact_io.Artifact):
        self.artifact = art
        self.model, self.classes, self.preprocess = art.model.eval(), art.classes, art.preprocess
        self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, path) -> "Predictor":
        return cls(artifact_io.load(path))

    def probabilities(self, images) -> np.ndarray:
        """Decoded PIL images (or paths/bytes) -> probabilities N x K."""
        tensors = [image_to_uint8(img if hasattr(img, "size") and hasattr(img, "mode")
                                  else decode_image(img, self.preprocess.channels), self.preprocess)
                   for img in images]
        if not tensors:
            return np.zeros((0, len(self.classes)), np.float32)
        batch = torch.stack([self._channels(t) for t in tensors])
        probs, _, _ = predict_batches(self.model, [(batch, torch.zeros(len(batch), dtype=torch.long), torch.arange(len(batch)))],
                                      self.preprocess)
        return probs

    def _channels(self, t: torch.Tensor) -> torch.Tensor:
        """A PIL image passed in directly may have another mode than the model expects."""
        c = self.preprocess.channels
        if t.shape[0] == c:
            return t
        if c == 1:
            return t.float().mean(0, keepdim=True).round().to(torch.uint8)
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]

    def predict_files(self, paths: list[Path], k: int = 5, batch_size: int = 64):
        """Returns ([{path, top_k}], [(path, reason)] for unreadable files)."""
        results, failures = [], []
        k = min(k, len(self.classes))
        for start in range(0, len(paths), batch_size):
            chunk, tensors = [], []
            for p in paths[start:start + batch_size]:
                try:
                    tensors.append(image_to_uint8(decode_image(p, self.preprocess.channels), self.preprocess))
                    chunk.append(p)
                except ImageDecodeError as e:
                    failures.append((p, e.reason))
            if not tensors:
                continue
            batch = torch.stack(tensors)
            probs, _, _ = predict_batches(self.model, [(batch, torch.zeros(len(batch), dtype=torch.long),
                                                        torch.arange(len(batch)))], self.preprocess)
            results += [{"path": str(p), "top_k": top_k(row, self.classes, k)} for p, row in zip(chunk, probs)]
        return results, failures
