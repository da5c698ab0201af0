"""Predict classes for image files with a saved model (artifact folder) or an exported ONNX file.
Imports only the artifact, decoding and preprocessing: never the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.decode import decode_image
from .data.transforms import batch_to_input, image_to_uint8
from .errors import ImageDecodeError


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


class Predictor:
    """Decoded images -> probabilities with the artifact's own preprocessing."""

    def __init__(self, art):
        self.artifact = art
        self.classes, self.preprocess = art.classes, art.preprocess
        self.model = art.model.eval().to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, path) -> "Predictor":
        path = Path(path)
        if path.suffix == ".onnx":
            return OnnxPredictor(path)
        from . import artifact as artifact_io
        return cls(artifact_io.load(path))

    def _probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 N x C x H x W -> probabilities N x K."""
        with torch.inference_mode():
            return torch.softmax(self.model(batch_to_input(batch, self.preprocess)).float(), dim=1).numpy()

    def _to_uint8(self, image) -> torch.Tensor:
        c = self.preprocess.channels
        if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image given directly
            from .data.decode import to_mode
            image = to_mode(image, c)
        else:
            image = decode_image(image, c)
        return image_to_uint8(image, self.preprocess)

    def probabilities(self, images) -> np.ndarray:
        """PIL images, paths or bytes -> probabilities N x K."""
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        return self._probabilities(torch.stack([self._to_uint8(img) for img in images]))

    def predict_files(self, paths: list[Path], k: int = 5, batch_size: int = 64):
        """Returns ([{path, top_k}], [(path, reason)] for unreadable files)."""
        results, failures = [], []
        k = min(k, len(self.classes))
        for start in range(0, len(paths), batch_size):
            chunk, tensors = [], []
            for p in paths[start:start + batch_size]:
                try:
                    tensors.append(self._to_uint8(p))
                    chunk.append(p)
                except ImageDecodeError as e:
                    failures.append((p, e.reason))
            if tensors:
                probs = self._probabilities(torch.stack(tensors))
                results += [{"path": str(p), "top_k": top_k(row, self.classes, k)} for p, row in zip(chunk, probs)]
        return results, failures


class OnnxPredictor(Predictor):
    """The same predictions from an exported ONNX file, run by ONNX Runtime."""

    def __init__(self, path: Path):
        from .export import OnnxModel
        self.onnx = OnnxModel(path)
        self.artifact = None
        self.classes, self.preprocess = self.onnx.classes, self.onnx.preprocess

    def _probabilities(self, batch: torch.Tensor) -> np.ndarray:
        x = batch_to_input(batch, self.preprocess, memory_format=torch.contiguous_format).numpy()
        return self.onnx.probabilities_from_input(x)
