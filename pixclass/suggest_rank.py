"""Which unlabeled images to label next: the most uncertain ones, kept apart from each other.

Uncertainty alone picks clusters of near-duplicates (ten frames of the same scene the model
hesitates on teach it one thing), so the ranking walks the images from most to least uncertain
and skips one whose embedding is too close (cosine) to an image already picked; only if that
leaves fewer than asked are the skipped ones taken, most uncertain first."""

from __future__ import annotations

import numpy as np

MEASURES = ("margin", "entropy")
# cosine similarity of backbone embeddings above which two images count as near-identical
SIMILAR = 0.9


def uncertainty(probs: np.ndarray, measure: str = "margin") -> np.ndarray:
    """N scores in [0, 1], higher = less sure: 1 - (top1 - top2), or the entropy over log(K)."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    if measure == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        return -(p * np.log(p)).sum(1) / np.log(probs.shape[1])
    top = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top[:, 1] - top[:, 0])


def pick_diverse(scores: np.ndarray, embeddings: np.ndarray | None, n: int, similar: float = SIMILAR) -> list[int]:
    """Indices of `n` images, most uncertain first, none (while there are enough) with a cosine
    similarity above `similar` to one picked before it. Without embeddings: by score alone."""
    order = np.argsort(-scores, kind="stable")
    n = min(n, len(order))
    if embeddings is None:
        return order[:n].tolist()
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    picked, skipped = [], []
    closest = np.full(len(order), -1.0)  # each image's highest similarity to the picks so far
    for i in order:
        if len(picked) == n:
            break
        if closest[i] > similar:
            skipped.append(i)
            continue
        picked.append(int(i))
        np.maximum(closest, unit @ unit[i], out=closest)
    return picked + [int(i) for i in skipped[:n - len(picked)]]
