"""Active learning on CIFAR-10: does labeling what `pixclass suggest` picks beat labeling at random?

Per seed: 500 labeled training images (drawn at random), a pool of 5,000 other training images
and 2,000 test images. A cheap model (logistic regression on the frozen EfficientNet-Lite0
embeddings that the few-shot and transfer recipes use, computed once into pixclass's feature
cache) is fitted on the 500; then 500 more are labeled, either the ones pixclass's suggestion
ranking picks (pixclass.suggest_rank: margin uncertainty, clustered for diversity), the 500 most
uncertain by margin alone, or 500 random ones; the model is refitted and scored on the test
images. Prints the test accuracy of each arm per seed, the means, and on how many seeds the
suggested picks beat the random ones, as JSON.
usage: python bench/active.py [CIFAR_ROOT] [--seeds 3] [--labeled 500] [--pool 5000] [--add 500] [--test 2000]"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pixclass.data.scan import scan_dataset
from pixclass.models.registry import create_model, family_for
from pixclass.progress import Reporter
from pixclass.suggest_rank import pick_diverse, uncertainty
from pixclass.train.features import extract_features
from pixclass.train.recipes.fewshot import embeddings_of

MODEL = "efficientnet_lite0"


def embeddings(paths: list, labels: list) -> np.ndarray:
    """N x D unit-norm pooled embeddings of the frozen backbone (from the cache where present)."""
    # seeded: the cache's key digests the whole model (its unused head too), so a fixed head
    # makes a second run find the features the first one computed
    torch.manual_seed(0)
    model, _ = create_model(MODEL, 10)
    pre = family_for(MODEL).preprocess(model, 3, None)
    rows, failures = extract_features(model.eval(), model.n_units, {"all": (paths, labels, 0)}, pre, None, 0,
                                      Reporter())
    if failures:
        raise SystemExit(f"unreadable files: {failures[:3]}")
    return embeddings_of(rows["all"])


def accuracy(x, y, train_idx, test_x, test_y, c: float) -> tuple[float, np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=c, max_iter=3000).fit(x[train_idx], y[train_idx])
    return float((clf.predict(test_x) == test_y).mean()), clf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("/tmp/d/cifar10"))
    for name, default in (("seeds", 3), ("labeled", 500), ("pool", 5000), ("add", 500), ("test", 2000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--c", type=float, default=10.0, help="inverse regularization of the logistic regression")
    args = parser.parse_args()
    train = scan_dataset(args.root / "train", (1.0, 0.0, 0.0), 0)
    test = scan_dataset(args.root / "test", (1.0, 0.0, 0.0), 0)
    rng = np.random.default_rng(0)
    # one fixed sample of the training images, large enough for every seed's labeled set and pool
    n_train = min(len(train.samples), args.labeled + args.pool + 2000)
    train_pick = rng.choice(len(train.samples), n_train, replace=False)
    test_pick = rng.choice(len(test.samples), args.test, replace=False)
    train_samples = [train.samples[i] for i in train_pick]
    test_samples = [test.samples[i] for i in test_pick]
    started = time.perf_counter()
    y = np.array([train.classes.index(s.label) for s in train_samples])
    test_y = np.array([train.classes.index(s.label) for s in test_samples])
    x = embeddings([s.path for s in train_samples], y.tolist())
    test_x = embeddings([s.path for s in test_samples], test_y.tolist())
    features_s = time.perf_counter() - started
    runs = []
    for seed in range(args.seeds):
        order = np.random.default_rng(seed + 1).permutation(n_train)
        labeled, pool = order[:args.labeled], order[args.labeled:args.labeled + args.pool]
        start_acc, clf = accuracy(x, y, labeled, test_x, test_y, args.c)
        probs = clf.predict_proba(x[pool])
        margin = uncertainty(probs, "margin")
        arms = {"suggest": pool[pick_diverse(margin, x[pool], args.add)],
                "margin_alone": pool[np.argsort(-margin, kind="stable")[:args.add]],
                "random": np.random.default_rng(seed + 100).choice(pool, args.add, replace=False)}
        runs.append({"seed": seed, "start": start_acc})
        for arm, picked in arms.items():
            runs[-1][arm] = accuracy(x, y, np.concatenate([labeled, picked]), test_x, test_y, args.c)[0]
        print(json.dumps(runs[-1]), flush=True)
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("start", "suggest", "margin_alone", "random")}
    print(json.dumps({"mean": mean, "suggest_minus_random": mean["suggest"] - mean["random"],
                      "seeds_suggest_beats_random": sum(r["suggest"] > r["random"] for r in runs),
                      "features_s": round(features_s, 1), "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
