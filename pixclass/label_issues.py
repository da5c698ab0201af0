"""Likely label errors in a class-folder dataset (`pixclass audit DATA --labels`).

Every labelled image (all splits) goes once through the frozen, offline ImageNet backbone; its
pooled features come from the same feature cache training uses, so a second audit computes none.
K logistic-regression heads, each fitted on K-1 folds, give every image out-of-fold predicted
probabilities: no image is scored by a head that saw its label (the heads' regularization is the
one of a few whose out-of-fold predictions have the lowest log-loss). cleanlab's `find_label_issues`
then picks the images whose given label those probabilities contradict, ranked by label quality
(the probability of the given label), each with the class the heads suggest instead. Nothing in
the dataset is written: moving files is `--fix relabel` (data/relabel.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DEFAULT_MODEL
from .data.scan import scan_dataset
from .errors import DatasetError
from .extras import require
from .metrics import cross_entropy
from .models.pretrained import load_backbone, pretrained_preprocess, timm_name
from .models.transfer import TransferModel
from .progress import Reporter
from .train.features import extract_features

FOLDS = 5


@dataclass
class LabelIssues:
    classes: list[str]
    issues: list[dict]  # ranked, most likely wrong first: path, split, given, suggested, score
    images: int
    folds: int
    backbone: str
    accuracy: float  # of the out-of-fold predictions against the given labels
    strength: float  # the heads' inverse regularization, chosen by out-of-fold log-loss
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "folds": self.folds, "images": self.images,
                "out_of_fold_accuracy": round(self.accuracy, 4), "C": self.strength, "count": len(self.issues),
                "timings": self.timings, "issues": self.issues}


def backbone_features(paths: list[Path], labels: list[int], num_classes: int, seed: int,
                      reporter: Reporter, backbone: str = DEFAULT_MODEL) -> tuple[np.ndarray, list[Path], list[int]]:
    """Pooled features (N x F, float32) of the frozen ImageNet backbone, through the feature cache;
    with the paths and labels of the images that decoded."""
    model = TransferModel(timm_name(backbone), num_classes)
    load_backbone(model.backbone, backbone)
    model.eval()
    pre = pretrained_preprocess(model.backbone)  # 224 px: small images are upsampled, as transfer learning does
    rows, _ = extract_features(model, model.n_units, {"all": (paths, labels, 0)}, pre, None, seed, reporter)
    split = rows["all"]
    return split.tensor()[:, 0].numpy(), list(split.paths), split.labels.tolist()


# inverse regularization strengths tried for the heads (on standardized features): the one whose
# out-of-fold predictions have the lowest log-loss is kept, as confident learning needs
# probabilities that are right about their own confidence
STRENGTHS = (0.001, 0.003, 0.01, 0.03)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                              strengths=STRENGTHS) -> tuple[np.ndarray, float]:
    """(N x classes probabilities, each from a logistic regression fitted without that image;
    the regularization chosen)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    best = None
    # one BLAS thread: these fits are small, and more threads only fight over the cores
    with threadpool_limits(limits=1):
        for c in strengths:
            head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
            probs = cross_val_predict(head, features, labels, cv=splitter, method="predict_proba")
            loss = cross_entropy(labels, probs)
            if best is None or loss < best[0]:
                best = (loss, probs, c)
    return best[1], best[2]


def find_label_issues(root, folds: int = FOLDS, seed: int = 0, reporter: Reporter | None = None) -> LabelIssues:
    reporter = reporter or Reporter()
    filters = require("cleanlab.filter", "labels", "pixclass audit --labels")
    scanned = scan_dataset(root)
    if scanned.multilabel:  # confident learning here ranks one given label per image against the others
        raise DatasetError(f"audit --labels checks one label per image; {root} is multi-label")
    classes = scanned.classes
    index = {c: i for i, c in enumerate(classes)}
    samples = scanned.samples
    counts = np.bincount([index[s.label] for s in samples], minlength=len(classes))
    if len(classes) < 2 or counts.min() < 2:
        raise DatasetError(f"--labels needs at least 2 classes of at least 2 images each in {root}")
    folds = int(min(folds, counts.min()))
    started = time.perf_counter()
    features, paths, labels = backbone_features([s.path for s in samples], [index[s.label] for s in samples],
                                                len(classes), seed, reporter)
    timings = {"features_s": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    labels = np.asarray(labels)
    probs, strength = out_of_fold_probabilities(features, labels, folds, seed)
    timings["heads_s"] = round(time.perf_counter() - started, 2)
    ranked = filters.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    split_of = {s.path: s.split for s in samples}
    issues = [{"path": str(paths[i]), "split": split_of[paths[i]], "given": classes[labels[i]],
               "suggested": classes[int(probs[i].argmax())], "score": round(float(probs[i, labels[i]]), 4)}
              for i in ranked]
    accuracy = float((probs.argmax(1) == labels).mean())
    reporter.info(f"label issues: {len(issues)} of {len(labels)} images (out-of-fold accuracy {accuracy:.3f}, "
                  f"{folds} folds, C {strength:g})")
    return LabelIssues(classes, issues, len(labels), folds, DEFAULT_MODEL, accuracy, strength, timings)
