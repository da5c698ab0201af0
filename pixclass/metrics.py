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


def macro_f1(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> float:
    """Mean F1 over the classes present among `labels`."""
    present = [c["f1"] for c in per_class_report(labels, preds, classes) if c["support"] > 0]
    return float(np.mean(present)) if present else 0.0


def likely_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Which images look mislabeled, by confident learning (the rule of cleanlab's confident
    joint): each class's threshold is the mean probability the model gives it on the images
    labelled with it; an image counts when the most probable class reaching its threshold is not
    the given one. For held-out predictions at the end of a run, in numpy: a training run does not
    import cleanlab (`pixclass audit --labels` runs cleanlab itself on out-of-fold predictions)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return np.zeros(0, dtype=bool)
    k = probs.shape[1]
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else np.inf for j in range(k)])
    confident = probs >= thresholds[None, :]
    candidate = np.where(confident, probs, -1.0).argmax(axis=1)
    return confident.any(axis=1) & (candidate != labels)


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    if not len(labels):
        return 0.0
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], k: int = 5) -> dict:
    """Accuracy, loss, top-k, macro-F1, per-class report and confusion matrix.

    A class with no image among `labels` cannot be scored: it is listed in `absent_classes`, and
    `macro_f1` is the mean over the classes that are present (its per-class F1 of 0 would only
    say that it was not evaluated)."""
    preds = probs.argmax(axis=1)
    per_class = per_class_report(labels, preds, classes)
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "loss": cross_entropy(labels, probs),
        f"top{min(k, len(classes))}_accuracy": top_k_accuracy(labels, probs, k),
        "macro_f1": macro_f1(labels, preds, classes),
        "absent_classes": [c["class"] for c in per_class if c["support"] == 0],
        "n": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, preds, len(classes)).tolist(),
    }


def absent_classes_note(metrics: dict, where: str) -> str | None:
    """A warning for classes that had no image in the evaluated data, or None."""
    absent = metrics.get("absent_classes") or []
    if not absent:
        return None
    return (f"class(es) with no image in {where}, not evaluated: {', '.join(absent)} "
            f"(macro F1 is over the other {len(metrics['per_class']) - len(absent)})")


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error and the reliability table: per confidence bin, the share of
    samples, their mean confidence and their accuracy."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": 0,
                          "confidence": None, "accuracy": None})
            continue
        c, a = float(conf[mask].mean()), float(correct[mask].mean())
        ece += mask.mean() * abs(a - c)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                      "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": table}


def most_confused(matrix, classes: list[str], top: int = 10) -> list[dict]:
    """Off-diagonal cells of the confusion matrix, largest first."""
    m = np.asarray(matrix)
    pairs = [(int(m[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and m[i, j] > 0]
    pairs.sort(reverse=True)
    return [{"true": classes[i], "predicted": classes[j], "count": n,
             "share_of_true": float(n / max(m[i].sum(), 1))} for n, i, j in pairs[:top]]


def per_sample_loss(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))


# -- multi-label: labels are multi-hot N x K, probabilities independent per class ---------------

DEFAULT_THRESHOLD = 0.5  # a class without a positive validation image keeps it


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under one class's precision-recall curve as scikit-learn's average_precision_score
    computes it (the precision at each distinct score, weighted by the recall it adds); 0 without
    a positive."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # cut only between distinct scores
    tp = np.cumsum(positive)[last_of_ties]
    precision = tp / (last_of_ties + 1)
    recall_gain = np.diff(np.r_[0, tp]) / positive.sum()
    return float((precision * recall_gain).sum())


def tune_thresholds(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per class, the probability threshold with the best F1 on these (validation) images: the
    midpoint between the lowest score kept and the next one below it; DEFAULT_THRESHOLD for a
    class with no positive image."""
    thresholds = []
    for j in range(probs.shape[1]):
        positive = labels[:, j] > 0.5
        if not positive.any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-probs[:, j], kind="mergesort")
        scores, hit = probs[order, j], positive[order]
        cuts = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # keep rows 0..cut
        tp = np.cumsum(hit)[cuts]
        f1 = 2 * tp / (cuts + 1 + positive.sum())
        best = cuts[int(np.argmax(f1))]
        below = scores[best + 1] if best + 1 < len(scores) else 0.0
        thresholds.append(round(float((scores[best] + below) / 2), 6))
    return thresholds


def binary_cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    if not len(labels):
        return 0.0
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], thresholds) -> dict:
    """Per class precision, recall, F1 (at its threshold), average precision and support; macro-F1
    and mAP over the classes with a positive image (the others are `absent_classes`), micro-F1,
    `accuracy` (the share of images whose predicted set is exactly their set) and the mean
    binary cross-entropy as `loss`."""
    labels = np.asarray(labels) > 0.5
    predicted = probs >= np.asarray(thresholds, dtype=np.float32)[None, :]
    tp, fp, fn = (predicted & labels).sum(0), (predicted & ~labels).sum(0), (~predicted & labels).sum(0)
    per_class = []
    for j, c in enumerate(classes):
        p = tp[j] / (tp[j] + fp[j]) if tp[j] + fp[j] else 0.0
        r = tp[j] / (tp[j] + fn[j]) if tp[j] + fn[j] else 0.0
        per_class.append({"class": c, "precision": float(p), "recall": float(r),
                          "f1": float(2 * p * r / (p + r)) if p + r else 0.0,
                          "average_precision": average_precision(labels[:, j], probs[:, j]),
                          "threshold": float(thresholds[j]), "support": int(labels[:, j].sum())})
    present = [c for c in per_class if c["support"] > 0]
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    return {
        "task": "multilabel",
        "accuracy": float((predicted == labels).all(axis=1).mean()) if len(labels) else 0.0,
        "loss": binary_cross_entropy(labels.astype(np.float32), probs),
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "micro_f1": float(micro),
        "mAP": float(np.mean([c["average_precision"] for c in present])) if present else 0.0,
        "absent_classes": [c["class"] for c in per_class if c["support"] == 0],
        "n": int(len(labels)),
        "per_class": per_class,
    }


def metrics_for(labels: np.ndarray, probs: np.ndarray, classes: list[str], thresholds=None) -> dict:
    """classification_metrics, or for a multi-label model (`thresholds` given) multilabel_metrics."""
    if thresholds is not None:
        return multilabel_metrics(labels, probs, classes, thresholds)
    return classification_metrics(labels, probs, classes)
