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

With `--embedding` (pretrained backbones), also the cosine similarity of the backbone's pooled
features to the nearest training image's.

usage: python bench/calibration_ood.py RUN_DIR OOD_FOLDER [--ood-limit N] [--keep 0.95] [--embedding] [--json FILE]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixclass import artifact as artifact_io  # noqa: E402
from pixclass.calibration import fit_temperature  # noqa: E402
from pixclass.data.loaders import load_split  # noqa: E402
from pixclass.data.scan import read_manifest, scan_class_folders  # noqa: E402
from pixclass.inference import logits_of_batches  # noqa: E402
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
    return logits_of_batches(art.model, art.preprocess, split.batches(128), art.tta)


def scores(logits: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    """Candidate in-distribution scores (higher: more like the training data), per image."""
    probs = combine_views(logits, temperature)
    return {"max_probability": probs.max(1).values.numpy(),
            "max_logit": logits.max(2).values.mean(0).numpy(),
            "energy": (temperature * torch.logsumexp(logits / temperature, dim=2)).mean(0).numpy()}


def embedding_scores(args, art, ood_paths) -> dict[str, np.ndarray]:
    """A pretrained backbone's pooled features: each image's cosine similarity to its nearest
    training image (deep nearest neighbours, Sun et al. 2022), for val, test and OOD images."""
    cache = args.run_dir / f"bench_embeddings_{args.ood.name}_{len(ood_paths)}.pt"
    if cache.is_file():
        embedded = torch.load(cache, weights_only=False)
    else:
        def embed(paths, labels):
            split, _ = load_split(paths, labels, art.preprocess, Reporter(quiet=True), max_memory_gb=8)
            features, _ = logits_of_batches(art.model.backbone, art.preprocess, split.batches(64))
            return torch.nn.functional.normalize(features[0], dim=1)
        embedded = {name: embed(*split_files(args.run_dir, art, name)) for name in ("train", "val", "test")}
        embedded["ood"] = embed(ood_paths, [0] * len(ood_paths))
        torch.save(embedded, cache)
    return {name: (embedded[name] @ embedded["train"].T).max(1).values.numpy() for name in ("val", "test", "ood")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("ood", type=Path)
    parser.add_argument("--ood-limit", type=int, default=2000)
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--embedding", action="store_true", help="also kNN on a pretrained backbone's features")
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
        threshold = float(np.quantile(val_s[name], 1 - args.keep))
        truth = np.r_[np.ones(len(test_s[name])), np.zeros(len(ood_s[name]))]
        result["scores"][name] = {
            "auroc": float(roc_auc_score(truth, np.r_[test_s[name], ood_s[name]])),
            "threshold": threshold, "test_unknown": float((test_s[name] < threshold).mean()),
            "ood_unknown": float((ood_s[name] < threshold).mean())}
    if args.embedding:
        knn = embedding_scores(args, art, ood_paths)
        truth = np.r_[np.ones(len(knn["test"])), np.zeros(len(knn["ood"]))]
        threshold = float(np.quantile(knn["val"], 1 - args.keep))
        result["scores"]["embedding_knn"] = {
            "auroc": float(roc_auc_score(truth, np.r_[knn["test"], knn["ood"]])), "threshold": threshold,
            "test_unknown": float((knn["test"] < threshold).mean()), "ood_unknown": float((knn["ood"] < threshold).mean())}
    stored = getattr(art, "abstain", None)
    if stored is not None:
        s_test, s_ood = scores(test_logits, art.temperature)[stored.method], scores(ood_logits, art.temperature)[stored.method]
        result["stored"] = {"method": stored.method, "threshold": stored.threshold,
                            "test_unknown": float((s_test < stored.threshold).mean()),
                            "ood_unknown": float((s_ood < stored.threshold).mean())}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
