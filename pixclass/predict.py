"""Predict classes for image files with a saved model (artifact folder) or an exported ONNX or
TFLite file, through the inference backends. Imports only the artifact, decoding and
preprocessing: never the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.decode import decode_image, to_mode
from .data.loaders import DecodeAhead
from .data.transforms import image_to_uint8
from .abstain import UNKNOWN, Abstain
from .inference import Backend, TorchBackend, open_backend


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


def labels_above(probs: np.ndarray, classes: list[str], thresholds: list[float]) -> list[dict]:
    """A multi-label model's answer for one image: every class whose probability reaches its
    threshold, likeliest first, with its probability."""
    return [{"class": classes[i], "probability": float(probs[i])} for i in np.argsort(-probs) if probs[i] >= thresholds[i]]


def answer(probs: np.ndarray, classes: list[str], k: int, abstain: Abstain | None,
           thresholds: list[float] | None = None, similarity: float | None = None) -> dict:
    """One image's probabilities (and feature similarity, None where the backend has none) ->
    {"answer": the top class, or "unknown" below the abstain threshold; "unknown": whether it is
    (a class may be named "unknown"); "score": the abstain score (None without a threshold);
    "top_k": the k likeliest classes}. A multi-label model's (`thresholds` given): "labels", every
    class whose probability reaches its threshold (likeliest first), and "answer" those labels
    joined by spaces (empty for none)."""
    if thresholds is not None:
        labels = [c["class"] for c in labels_above(probs, classes, thresholds)]
        return {"answer": " ".join(labels), "labels": labels, "unknown": False, "score": None,
                "top_k": top_k(probs, classes, k)}
    best = classes[int(np.argmax(probs))]
    if abstain is not None:
        abstain = abstain.applied(similarity is not None)
    if abstain is None:
        return {"answer": best, "unknown": False, "score": None, "top_k": top_k(probs, classes, k)}
    score = float(abstain.scores(probs[None], None if similarity is None else np.asarray([similarity]))[0])
    unknown = score < abstain.threshold
    return {"answer": UNKNOWN if unknown else best, "unknown": bool(unknown), "score": score,
            "top_k": top_k(probs, classes, k)}


def per_image(probs: np.ndarray, similarity: np.ndarray | None) -> list[tuple[np.ndarray, float | None]]:
    """A backend's scores -> one (probabilities, similarity or None) pair per image."""
    return [(p, None if similarity is None else float(similarity[i])) for i, p in enumerate(probs)]


class Predictor:
    """Decoded images -> probabilities with the model's own preprocessing, on any backend, and
    answers: a class, or "unknown" below the model's abstain threshold."""

    def __init__(self, source, abstain: bool = True):
        """`source`: a Backend, or a loaded artifact (run with PyTorch). `abstain=False`: always a
        class, whatever the model's abstain threshold."""
        self.backend = source if isinstance(source, Backend) else TorchBackend.from_artifact(source)
        self.classes, self.preprocess = self.backend.classes, self.backend.preprocess
        self.abstain = self.backend.abstain if abstain else None
        self.thresholds = self.backend.thresholds  # a multi-label model's; None: single-label

    @classmethod
    def load(cls, path, abstain: bool = True) -> "Predictor":
        """A saved model folder, an .onnx or a .tflite file."""
        return cls(open_backend(path), abstain)

    def probabilities_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 N x C x H x W -> probabilities N x K."""
        return self.backend.probabilities_uint8(batch)

    def answers_uint8(self, batch: torch.Tensor, k: int) -> list[dict]:
        """uint8 N x C x H x W -> N answers (see `answer`)."""
        return [answer(p, self.classes, k, self.abstain, self.thresholds, s)
                for p, s in per_image(*self.backend.scores_uint8(batch))]

    def to_uint8(self, image) -> torch.Tensor:
        """A PIL image, path or bytes -> uint8 C x H x W at the model's size."""
        c = self.preprocess.channels
        if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image given directly
            image = to_mode(image, c)
        else:
            image = decode_image(image, c)
        return image_to_uint8(image, self.preprocess)

    def probabilities(self, images) -> np.ndarray:
        """PIL images, paths or bytes -> probabilities N x K."""
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.probabilities_uint8(torch.stack([self.to_uint8(img) for img in images]))

    def predict_files(self, paths: list[Path], k: int = 5, batch_size: int = 64):
        """Returns ([{path, top_k}], [(path, reason)] for unreadable files), in file order: the
        records of predict_stream, gathered."""
        results, failures = [], []
        for records in self.predict_stream(paths, k=k, batch_size=batch_size):
            for r in records:
                if "error" in r:
                    failures.append((r["path"], r["error"]))
                else:
                    results.append(r)
        return results, failures

    def predict_stream(self, paths: list[Path], k: int = 5, batch_size: int = 64, workers: int | None = None,
                       max_bytes: int = 1 << 27):
        """Per batch of `paths`, in their order: a list of records, {"path", **answer(...)} for an image
        and {"path", "error"} for a file that cannot be read. Files are decoded by worker
        processes (data.loaders.DecodeAhead) up to `max_bytes` of images ahead of the model, so
        decoding and inference overlap and memory stays flat however many files there are."""
        k = min(k, len(self.classes))
        decoded = DecodeAhead(paths, self.preprocess, batch_size=batch_size, max_bytes=max_bytes, workers=workers)
        try:
            for chunk in decoded:
                images = [img for _, img, _ in chunk if img is not None]
                rows = iter(self.answers_uint8(torch.stack(images), k) if images else [])
                yield [{"path": str(paths[i]), **next(rows)} if img is not None
                       else {"path": str(paths[i]), "error": reason} for i, img, reason in chunk]
        finally:
            decoded.close()
