"""How many wrong labels frozen features can find at best (issue 19, acceptance 1).

The audit fits its heads out-of-fold on the noisy images themselves (1,600 labels a fold, 5% of
them wrong). This asks what the same frozen features give when that limit is lifted: heads fitted
on up to EXTRA *clean* CIFAR-10 training images per class, disjoint from the noisy copy, then
asked for the given label's probability on each of the 2,000 noisy images (the same copy as
bench/label_noise.py: first 200 JPEGs per class, 5% moved into another random class, seeded).
No audit can have such heads; if even they leave the flipped files short of 80 among the top
100, no head on these features reaches the acceptance figure.

Prints, for the audit's own out-of-fold heads and for clean heads on 160 to EXTRA images per
class (logistic regression at several C, and a one-hidden-layer MLP on the largest): accuracy
against the true labels and the flipped files among the 100 lowest given-label probabilities.
Features are computed once per backbone (a 2,000 + 10 x EXTRA image pass) and kept in --cache.

usage: python bench/label_noise_ceiling.py CIFAR_TRAIN_DIR [--extra 2000] [--backbone efficientnet_lite0]
       [--cache DIR]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.label_noise import build_noisy_copy  # noqa: E402
from bench.label_noise_variants import pooled_layers  # noqa: E402
from pixclass.label_issues import out_of_fold_probabilities  # noqa: E402

PER_CLASS, FRACTION = 200, 0.05


def flipped_found(probs: np.ndarray, given: np.ndarray, flipped: np.ndarray) -> int:
    """Flipped files among as many lowest given-label probabilities as there are flipped files."""
    order = np.argsort(probs[np.arange(len(given)), given])
    return int(flipped[order[:int(flipped.sum())]].sum())


def clean_heads(features, labels, noisy, given, true, flipped, sizes) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    out = {}
    for size in sizes:
        rows = np.concatenate([np.flatnonzero(labels == k)[:size] for k in np.unique(labels)])
        heads = {f"logistic C {c}": LogisticRegression(C=c, max_iter=2000) for c in (0.001, 0.003, 0.01, 0.03)}
        if size == sizes[-1]:
            heads["MLP 512, alpha 1"] = MLPClassifier((512,), alpha=1.0, early_stopping=True, random_state=0)
        for name, head in heads.items():
            probs = make_pipeline(StandardScaler(), head).fit(features[rows], labels[rows]).predict_proba(noisy)
            out[f"{size} clean per class, {name}"] = {"accuracy": round(float((probs.argmax(1) == true).mean()), 4),
                                                      "found": flipped_found(probs, given, flipped)}
            print(f"{size:>5} clean per class, {name}: {out[f'{size} clean per class, {name}']}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="CIFAR-10 train/ (class folders of JPEGs)")
    parser.add_argument("--extra", type=int, default=2000, help="clean images per class for the heads, at most")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "noisy"
        wrong = build_noisy_copy(args.source, data, PER_CLASS, FRACTION, args.seed)
        classes = sorted(d.name for d in data.iterdir())
        paths = sorted(p for c in classes for p in (data / c).iterdir())
        given = np.array([classes.index(p.parent.name) for p in paths])
        true = np.array([classes.index(p.name.split("_")[0]) for p in paths])  # build_noisy_copy names them so
        flipped = np.array([str(p) in wrong for p in paths])
        clean = [(f, k) for k, c in enumerate(classes)
                 for f in sorted((args.source / c).iterdir())[PER_CLASS:PER_CLASS + args.extra]]
        cache = args.cache / f"label_noise_ceiling_{args.backbone}_{args.seed}_{args.extra}.npz"
        started = time.perf_counter()
        if cache.is_file():
            saved = np.load(cache)
            noisy, features = saved["noisy"], saved["clean"]
        else:
            noisy = pooled_layers(args.backbone, paths)["head"]
            features = pooled_layers(args.backbone, [f for f, _ in clean])["head"]
            np.savez(cache, noisy=noisy, clean=features)
        seconds = round(time.perf_counter() - started, 1)
        probs, c = out_of_fold_probabilities(noisy, given, 5, args.seed)
        result = {"audit's out-of-fold heads": {"accuracy": round(float((probs.argmax(1) == true).mean()), 4),
                                                "found": flipped_found(probs, given, flipped), "C": c}}
        sizes = sorted({s for s in (160, 500, 1000, args.extra) if s <= args.extra})
        result.update(clean_heads(features, np.array([k for _, k in clean]), noisy, given, true, flipped, sizes))
    print(json.dumps({"backbone": args.backbone, "flipped": int(flipped.sum()), "feature_seconds": seconds,
                      "heads": result}, indent=2))


if __name__ == "__main__":
    main()
