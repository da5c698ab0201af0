"""Calibration and out-of-distribution scores of a trained run (issue 20), measured on its own
held-out split and on a folder of images from elsewhere.

For the run's saved model: the logits on each test-time view of the run's validation split (what
calibration and the abstain threshold are fitted on), of its held-out test split and of the
out-of-distribution images. Reports
- ECE (15 bins) and top-1 accuracy on the test split before and after temperature scaling, with
  the T fitted here and the T stored in the artifact (they should agree);
- for each candidate score (max softmax probability of the calibrated probabilities, max logit,
  negative energy at T): AUROC of test vs OOD images, and at the threshold that keeps `--keep` of the
  validation images the share of test and of OOD images that come back unknown;
- the same at the threshold stored in the artifact (its own method).

With `--own-features` (any model; `--embedding`, its earlier name, measured the same on the pretrained
backbone's pooled features, which are a transfer model's penultimate features), the deep
nearest-neighbour scores on the model's own penultimate features (pixclass.feature_bank, what the
`knn_similarity` abstain method deploys): the cosine similarity to the nearest training image with
the whole training split (or a seeded sample of `--train-limit` images) as the bank and with seeded
subsets of `--bank-sizes` images (float16, as the artifact stores them), and to the nearest class prototype (mean feature of each class).

usage: python bench/calibration_ood.py RUN_DIR OOD_FOLDER [--ood-limit N] [--keep 0.95]
       [--own-features] [--bank-sizes 4096,1024,256] [--train-limit N] [--json FILE]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_json  # noqa: E402

from pixclass import artifact as artifact_io  # noqa: E402
from pixclass.calibration import fit_temperature  # noqa: E402
from pixclass.data.loaders import load_split  # noqa: E402
from pixclass.data.scan import read_manifest, scan_class_folders  # noqa: E402
from pixclass.feature_bank import bank_indices, bank_of, features_of_batches, nearest_similarity  # noqa: E402
from pixclass.metrics import calibration  # noqa: E402
from pixclass.progress import Reporter  # noqa: E402
from pixclass.tta import combine_views  # noqa: E402


def split_files(run_dir: Path, art, split: str) -> tuple[list[Path], list[int]]:
    root = Path(art.config["data"]["path"])
    rows = read_manifest(run_dir / "manifest.csv", root)
    index = {c: i for i, c in enumerate(art.classes)}
    kept = sorted((p, index[c]) for p, (c, s) in rows.items() if s == split)
    return [p for p, _ in kept], [c for _, c in kept]


def logits_of(art, paths, labels):
    split, _ = load_split(paths, labels, art.preprocess, Reporter(quiet=True), max_memory_gb=8)
    logits, _, labels = features_of_batches(art.model, art.preprocess, split.batches(128), art.tta)
    return logits, labels


def scores(logits: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    """Candidate in-distribution scores (higher: more like the training data), per image."""
    probs = combine_views(logits, temperature)
    return {"max_probability": probs.max(1).values.numpy(),
            "max_logit": logits.max(2).values.mean(0).numpy(),
            "energy": (temperature * torch.logsumexp(logits / temperature, dim=2)).mean(0).numpy()}


def own_feature_scores(args, art, ood_paths) -> dict[str, dict[str, np.ndarray]]:
    """{score name: {"val"|"test"|"ood": per-image scores}} on the model's own penultimate features."""
    cache = args.run_dir / f"bench_features_{args.ood.name}_{len(ood_paths)}_{args.train_limit}.pt"
    if cache.is_file():
        feats = torch.load(cache, weights_only=False)
    else:
        def features(paths, labels):
            split, _ = load_split(paths, labels, art.preprocess, Reporter(quiet=True), max_memory_gb=8)
            _, f, y = features_of_batches(art.model, art.preprocess, split.batches(256), art.tta)
            return f, y
        feats = {name: features(*split_files(args.run_dir, art, name)) for name in ("val", "test")}
        paths, labels = split_files(args.run_dir, art, "train")
        keep = bank_indices(len(paths), args.train_limit or len(paths), seed=1)  # another sample than the run's bank
        feats["train"] = features([paths[i] for i in keep], [labels[i] for i in keep])
        feats["ood"] = features(ood_paths, [0] * len(ood_paths))
        torch.save(feats, cache)
    train, train_labels = feats["train"]
    out = {}
    for size in [len(train_labels)] + [int(s) for s in args.bank_sizes.split(",") if s]:
        bank = bank_of(train[:, bank_indices(len(train_labels), size)]).float()
        out[f"knn_own_features_bank{size}"] = {n: nearest_similarity(feats[n][0], bank).numpy()
                                               for n in ("val", "test", "ood")}
    labels = torch.as_tensor(train_labels)
    protos = torch.nn.functional.normalize(torch.stack([train[0][labels == c].mean(0) for c in labels.unique()]), dim=1)
    out["prototype_own_features"] = {n: nearest_similarity(feats[n][0], protos).numpy() for n in ("val", "test", "ood")}
    if art.feature_bank is not None:  # the bank the run stored (its threshold: `stored` below)
        out["knn_stored_bank"] = {n: nearest_similarity(feats[n][0], art.feature_bank.float()).numpy()
                                  for n in ("val", "test", "ood")}
    return out


def rate(val: np.ndarray, test: np.ndarray, ood: np.ndarray, keep: float) -> dict:
    """AUROC of test vs OOD, and at the threshold keeping `keep` of `val` the share of each below it."""
    threshold = float(np.quantile(val, 1 - keep))
    truth = np.r_[np.ones(len(test)), np.zeros(len(ood))]
    return {"auroc": float(roc_auc_score(truth, np.r_[test, ood])), "threshold": threshold,
            "test_unknown": float((test < threshold).mean()), "ood_unknown": float((ood < threshold).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("ood", type=Path)
    parser.add_argument("--ood-limit", type=int, default=2000)
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--own-features", "--embedding", action="store_true",
                        help="also kNN on the model's own penultimate features")
    parser.add_argument("--bank-sizes", default="4096,1024,256")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="features of this many training images at most (a seeded sample; 0: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    art = artifact_io.load(args.run_dir / "model")
    ood_paths = sorted(p for files in scan_class_folders(args.ood, []).values() for p in files)
    step = max(1, len(ood_paths) // args.ood_limit)
    ood_paths = ood_paths[::step][:args.ood_limit]
    cache = args.run_dir / f"bench_logits_{args.ood.name}_{len(ood_paths)}.pt"  # the model's outputs, computed once
    if cache.is_file():
        val_logits, val_labels, test_logits, test_labels, ood_logits = torch.load(cache, weights_only=False)
    else:
        val_logits, val_labels = logits_of(art, *split_files(args.run_dir, art, "val"))
        test_logits, test_labels = logits_of(art, *split_files(args.run_dir, art, "test"))
        ood_logits, _ = logits_of(art, ood_paths, [0] * len(ood_paths))
        torch.save((val_logits, val_labels, test_logits, test_labels, ood_logits), cache)
    fitted = fit_temperature(val_logits, val_labels)
    result = {"run": str(args.run_dir), "ood": str(args.ood), "n_val": len(val_labels), "n_test": len(test_labels),
              "n_ood": len(ood_paths), "tta": art.tta, "temperature_fitted": fitted,
              "temperature_stored": art.temperature}
    for name, t in (("before", 1.0), ("after", art.temperature if art.temperature != 1.0 else fitted)):
        probs = combine_views(test_logits, t).numpy()
        result[f"ece_{name}"] = calibration(test_labels, probs)["ece"]
        result[f"accuracy_{name}"] = float((probs.argmax(1) == test_labels).mean())
    t = result["temperature_stored"] if art.temperature != 1.0 else fitted
    val_s, test_s, ood_s = scores(val_logits, t), scores(test_logits, t), scores(ood_logits, t)
    result["scores"] = {}
    for name in val_s:
        result["scores"][name] = rate(val_s[name], test_s[name], ood_s[name], args.keep)
    own = own_feature_scores(args, art, ood_paths) if args.own_features or art.feature_bank is not None else {}
    for name, s in own.items():
        result["scores"][name] = rate(s["val"], s["test"], s["ood"], args.keep)
    stored = getattr(art, "abstain", None)
    if stored is not None:
        if stored.method == "knn_similarity":
            s_test, s_ood = own["knn_stored_bank"]["test"], own["knn_stored_bank"]["ood"]
        else:
            s_test, s_ood = (scores(test_logits, art.temperature)[stored.method],
                             scores(ood_logits, art.temperature)[stored.method])
        result["stored"] = {"method": stored.method, "threshold": stored.threshold,
                            "test_unknown": float((s_test < stored.threshold).mean()),
                            "ood_unknown": float((s_ood < stored.threshold).mean())}
    print_json(result, args.json)


if __name__ == "__main__":
    main()
