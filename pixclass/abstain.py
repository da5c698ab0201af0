"""The "unknown" answer: an image whose score is below a threshold fixed on the validation split
is answered `unknown` (with its score) rather than with a class.

Two scores (measured in bench/RESULTS.md, issue 20):
- "knn_similarity": the cosine similarity of the image's penultimate features to the nearest of
  a bank of training images' (feature_bank.py). What a run deploys: it tells images of other
  kinds and other classes apart far better than the classifier's confidence. It needs the bank
  (in the artifact) and a graph that computes it: PyTorch and the ONNX exports do;
- "max_probability": the top calibrated probability, which any reader of probabilities computes.
  A knn_similarity threshold carries one as its `fallback`, used by the exports that answer only
  probabilities (TFLite, Core ML) and by artifacts written before the bank existed.
Each threshold keeps `keep` of the in-distribution validation images. The artifact stores method,
threshold, `keep` and fallback (`abstain` in pixclass.json; absent in older files, which then never
abstain), and the exports carry the one they apply in their metadata."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("max_probability", "knn_similarity")
DEFAULT_KEEP = 0.95  # share of in-distribution validation images the threshold keeps
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Abstain:
    method: str
    threshold: float
    keep: float = DEFAULT_KEEP
    fallback: "Abstain | None" = None  # for readers of probabilities only: a max_probability threshold

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown abstain method {self.method!r} (one of {', '.join(METHODS)})")

    def to_dict(self) -> dict:
        d = {"method": self.method, "threshold": self.threshold, "keep": self.keep}
        if self.fallback is not None:  # absent otherwise, as in older files
            d["fallback"] = self.fallback.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Abstain | None":
        if not d:
            return None
        return cls(**{**d, "fallback": cls.from_dict(d.get("fallback"))})

    def applied(self, with_similarity: bool) -> "Abstain | None":
        """The threshold a reader applies: this one, or for a reader without the feature
        similarities (the probabilities alone) a knn_similarity threshold's max_probability
        fallback (None: it never abstains)."""
        return self if with_similarity or self.method == "max_probability" else self.fallback

    def scores(self, probs: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        """N scores, higher for images more like the training data."""
        return in_distribution_score(probs, self.method, similarity)

    def unknown(self, probs: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        """Probabilities N x K (and the similarities N its method needs) -> N booleans: below the
        threshold. Without similarities a knn_similarity threshold answers with its fallback."""
        applied = self.applied(similarity is not None)
        if applied is None:
            return np.zeros(len(probs), bool)
        return applied.scores(probs, similarity) < applied.threshold


def in_distribution_score(probs: np.ndarray, method: str = METHODS[0],
                          similarity: np.ndarray | None = None) -> np.ndarray:
    """Probabilities N x K (or the feature similarities N, for knn_similarity) -> N scores, higher
    for images more like the training data."""
    if method == "max_probability":
        return np.asarray(probs, dtype=np.float64).max(axis=1)
    if method == "knn_similarity":
        if similarity is None:
            raise ValueError("knn_similarity needs the feature similarities")
        return np.asarray(similarity, dtype=np.float64).reshape(-1)
    raise ValueError(f"unknown abstain method {method!r}")


def fit_abstain(probs: np.ndarray, keep: float = DEFAULT_KEEP, method: str = METHODS[0],
                similarity: np.ndarray | None = None, fallback: Abstain | None = None) -> Abstain | None:
    """The threshold that keeps `keep` of the validation images whose probabilities (and feature
    similarities) are given (their (1 - keep) quantile); None without images."""
    if len(probs) == 0:
        return None
    scores = in_distribution_score(probs, method, similarity)
    return Abstain(method, float(np.quantile(scores, 1 - keep)), keep, fallback)


def abstention_metrics(labels: np.ndarray, probs: np.ndarray, abstain: Abstain,
                       similarity: np.ndarray | None = None) -> dict:
    """How the threshold answers labelled in-distribution images: the share answered unknown and
    the accuracy on the rest."""
    unknown = abstain.unknown(probs, similarity)
    answered = ~unknown
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    return {"abstain": abstain.to_dict(), "unknown_share": float(unknown.mean()) if len(unknown) else 0.0,
            "answered_accuracy": float(correct[answered].mean()) if answered.any() else None}
