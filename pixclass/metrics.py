"""Classification metrics as pure functions of labels and probabilities.

Written with numpy rather than scikit-learn: each is a few lines over the confusion matrix, and
importing sklearn.metrics costs over a second at the end of every run."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_report(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (0 where undefined, as zero_division=0)."""
    m = confusion_matrix(labels, preds, len(classes)).astype(np.float64)
    tp, predicted, s = np.diag(m), m.sum(axis=0), m.sum(axis=1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, s, out=np.zeros_like(tp), where=s > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)]


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    if not len(labels):
        return 0.0
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], k: int = 5) -> dict:
    preds = probs.argmax(axis=1)
    per_class = per_class_report(labels, preds, classes)
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "loss": cross_entropy(labels, probs),
        f"top{min(k, len(classes))}_accuracy": top_k_accuracy(labels, probs, k),
        "macro_f1": float(np.mean([c["f1"] for c in per_class])),
        "n": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, preds, len(classes)).tolist(),
    }
