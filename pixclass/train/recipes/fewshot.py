"""Few-shot: a classifier fitted in seconds on the embeddings of a frozen pretrained backbone,
for datasets with a handful of images per class, where training even a head by gradient descent
would only memorize them.

Two candidates, both on L2-normalized pooled embeddings (computed once and cached, as the
transfer recipe's are): class prototypes (the mean embedding of each class, compared by cosine)
and a regularized logistic regression. Each is judged by leave-one-out accuracy on the training
images (every image classified by a model fitted without it), the better one is kept, and that
figure is reported as it is: with five images per class it is the only honest estimate there is
when no validation split is given. Either ends up as the rows of the model's `NormalizedLinear`
head, so the saved artifact is an ordinary one (predict, serve and export take it unchanged) and
`pixclass add-class` can append a class's prototype later."""

from __future__ import annotations

import time

import numpy as np
import torch

from ...config import RunConfig
from ...errors import UserError
from ...inference import softmax_probabilities
from ...models.transfer import NormalizedLinear
from . import FitResult, HeldOut, Job, Recipe, held_out_split
from .transfer import TransferRecipe, split_features

# leave-one-out fits one logistic regression per image: above this many images, 10 folds instead
MAX_LEAVE_ONE_OUT = 300
LINEAR_C = 10.0  # inverse regularization of the linear head, on unit-norm embeddings
PROTOTYPE_SCALES = (5.0, 10.0, 15.0, 20.0, 30.0, 50.0)  # cosine -> logit scales tried (the softmax's sharpness)


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototype_rows(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """classes x D unit-norm class means of unit-norm embeddings."""
    sums = np.zeros((classes, embeddings.shape[1]))
    np.add.at(sums, labels, embeddings)
    return normalized(sums)


def prototypes_left_out(x: np.ndarray, y: np.ndarray, classes: int) -> tuple[np.ndarray, float]:
    """(N x classes leave-one-out probabilities, the scale they were best calibrated at). Image i's
    own class is compared with its class mean without it; an image alone in its class has no
    prototype left and scores -1 for it (counted wrong, not skipped)."""
    sums = np.zeros((classes, x.shape[1]))
    np.add.at(sums, y, x)
    sims = x @ normalized(sums).T
    rest = sums[y] - x  # N x D: each image's class sum without it
    alone = np.linalg.norm(rest, axis=1) < 1e-9
    sims[np.arange(len(y)), y] = np.where(alone, -1.0, np.einsum("nd,nd->n", x, normalized(rest)))

    def nll(scale):
        p = _softmax(scale * sims)
        return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()
    scale = min(PROTOTYPE_SCALES, key=nll)
    return _softmax(scale * sims), scale


def linear_left_out(x: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    """N x classes held-out probabilities of the logistic regression: leave-one-out, or 10-fold
    above MAX_LEAVE_ONE_OUT images. A fold whose training part holds one class predicts it."""
    from sklearn.model_selection import KFold, LeaveOneOut
    folds = LeaveOneOut() if len(y) <= MAX_LEAVE_ONE_OUT else KFold(10, shuffle=True, random_state=0)
    out = np.zeros((len(y), classes))
    for train, held in folds.split(x):
        out[held] = _linear_probabilities(x[train], y[train], x[held], classes)
    return out


def fit_linear(x: np.ndarray, y: np.ndarray, classes: int):
    """(classes x D weights, biases) of the regularized logistic regression on all images, as
    softmax logits (a binary model's single row is split into two opposite halves)."""
    from sklearn.linear_model import LogisticRegression
    present = np.unique(y)
    weights, bias = np.zeros((classes, x.shape[1])), np.full(classes, -1e4)  # an absent class never wins
    if len(present) == 1:
        bias[present[0]] = 0.0
        return weights, bias
    clf = LogisticRegression(C=LINEAR_C, max_iter=2000).fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(present) == 2:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weights[clf.classes_], bias[clf.classes_] = coef, intercept
    return weights, bias


def _linear_probabilities(x_train, y_train, x, classes: int) -> np.ndarray:
    weights, bias = fit_linear(x_train, y_train, classes)
    return _softmax(x @ weights.T + bias)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def embeddings_of(split) -> np.ndarray:
    """N x D unit-norm embeddings of a split's cached pooled features (view 0)."""
    return normalized(np.concatenate([x[:, 0].numpy() for x, _, _ in split.batches(1024)]).astype(np.float64))


class FewShotRecipe(Recipe):
    name = "fewshot"
    description = "class prototypes or a regularized linear head on a frozen pretrained backbone's embeddings"
    decodes_images = False  # the files are decoded once, for the backbone's embeddings
    distributed = False  # seconds of work: rank 0 alone
    restart_note = "it fits in seconds from the feature cache"
    start_early = TransferRecipe.start_early  # decode while the backbone is built

    def check(self, cfg: RunConfig, family) -> None:
        if family.default_recipe(cfg.model.name, cfg.model) != "transfer":
            raise UserError(f"the fewshot recipe needs a pretrained backbone (e.g. efficientnet_lite0), "
                            f"not {cfg.model.name}")

    def fit(self, job: Job) -> FitResult:
        model, reporter, n_classes = job.model, job.reporter, len(job.data.classes)
        started = time.perf_counter()
        splits, skipped = split_features(job, model.n_units)  # at full depth: pooled vectors
        timings = {"features_s": round(time.perf_counter() - started, 2)}
        started = time.perf_counter()
        x, y = embeddings_of(splits["train"]), splits["train"].labels.numpy()
        method = "leave-one-out" if len(y) <= MAX_LEAVE_ONE_OUT else "10-fold"
        proto_probs, scale = prototypes_left_out(x, y, n_classes)
        linear_probs = linear_left_out(x, y, n_classes)
        scores = {"prototypes": float((proto_probs.argmax(1) == y).mean()),
                  "linear": float((linear_probs.argmax(1) == y).mean())}
        chosen = max(scores, key=lambda k: (scores[k], k == "prototypes"))  # a tie keeps the simpler one
        if chosen == "prototypes":
            weights, bias = scale * prototype_rows(x, y, n_classes), np.zeros(n_classes)
        else:
            weights, bias = fit_linear(x, y, n_classes)
        model.head = NormalizedLinear(x.shape[1], n_classes)
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(weights))
            model.head.bias.copy_(torch.from_numpy(bias))
        # the artifact rebuilds this head from its arch
        job.arch = {**job.arch, "kwargs": {**job.arch["kwargs"], "head": "normalized"}}
        timings["fit_s"] = round(time.perf_counter() - started, 2)
        reporter.info(f"few-shot: {method} accuracy on the {len(y)} training images: prototypes "
                      f"{scores['prototypes']:.3f}, linear {scores['linear']:.3f}; keeping the {chosen}")
        metrics = {"fewshot_head": chosen, "fewshot_estimate": method, "loo_accuracy": scores[chosen],
                   "loo_accuracy_prototypes": scores["prototypes"], "loo_accuracy_linear": scores["linear"]}
        model.cpu().eval()
        name, split = held_out_split(splits)
        held = None
        if split is not None:
            with torch.inference_mode():
                probs = softmax_probabilities(model.head(torch.from_numpy(embeddings_of(split)).float()))
            held = HeldOut(name, probs, split.labels.numpy(), list(split.paths))
        return FitResult([], held, skipped=skipped, timings=timings, metrics=metrics)


RECIPE = FewShotRecipe()
