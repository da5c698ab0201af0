"""The "unknown" answer: an image whose score is below a threshold fixed on the validation split
is answered `unknown` (with its score) rather than with a class.

The score is the top probability of the calibrated probabilities (max softmax probability): of
the scores measured (bench/RESULTS.md, issue 20) it is the one every backend and every export can
compute, since they all answer probabilities; the threshold is the one that keeps `keep` of the
in-distribution validation images. The artifact stores method, threshold and `keep`
(`abstain` in pixclass.json; absent in older files, which then never abstain), and the exports
carry them in their metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METHODS = ("max_probability",)
DEFAULT_KEEP = 0.95  # share of in-distribution validation images the threshold keeps
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Abstain:
    method: str
    threshold: float
    keep: float = DEFAULT_KEEP

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown abstain method {self.method!r} (one of {', '.join(METHODS)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Abstain | None":
        return cls(**d) if d else None

    def unknown(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities N x K -> N booleans: below the threshold."""
        return in_distribution_score(probs, self.method) < self.threshold


def in_distribution_score(probs: np.ndarray, method: str = METHODS[0]) -> np.ndarray:
    """Probabilities N x K -> N scores, higher for images more like the training data."""
    if method == "max_probability":
        return np.asarray(probs, dtype=np.float64).max(axis=1)
    raise ValueError(f"unknown abstain method {method!r}")


def fit_abstain(probs: np.ndarray, keep: float = DEFAULT_KEEP, method: str = METHODS[0]) -> Abstain | None:
    """The threshold that keeps `keep` of the validation images whose probabilities are `probs`
    (their (1 - keep) quantile); None without images."""
    if len(probs) == 0:
        return None
    scores = in_distribution_score(probs, method)
    return Abstain(method, float(np.quantile(scores, 1 - keep)), keep)


def abstention_metrics(labels: np.ndarray, probs: np.ndarray, abstain: Abstain) -> dict:
    """How the threshold answers labelled in-distribution images: the share answered unknown and
    the accuracy on the rest."""
    unknown = abstain.unknown(probs)
    answered = ~unknown
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    return {"abstain": abstain.to_dict(), "unknown_share": float(unknown.mean()) if len(unknown) else 0.0,
            "answered_accuracy": float(correct[answered].mean()) if answered.any() else None}
