"""Post-hoc out-of-distribution scores beyond the deployed ones (issue 20, acceptance 2).

bench/calibration_ood.py rates the scores pixclass deploys or could deploy from the logits and
the normalized features (max probability, max logit, energy, nearest-neighbour similarity). This
adds the post-hoc scores the OOD literature proposes for near-OOD:
- k-th nearest neighbour (Sun et al. 2022), for k = 1, 10 and 50;
- Mahalanobis distance to the nearest class mean (Lee et al. 2018), on raw and on normalized
  penultimate features, and its relative form, which subtracts the distance to one Gaussian fitted
  to all classes (Ren et al. 2021);
- ReAct (Sun et al. 2021): energy after clipping the penultimate activations at their 80th, 90th
  or 95th training percentile;
- rank averages of two scores.

With several runs trained on the same data (same seed: same split), it also rates their ensemble
(averaged probabilities, summed energies). The model must end in a linear layer named `head` with
an `output_scale`, as airbench does. Views are the image and its mirror, averaged.

usage: python bench/ood_post_hoc.py RUN_DIR [RUN_DIR ...] --ood OOD_FOLDER [--train-limit 10000] [--json FILE]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_json  # noqa: E402
from bench.calibration_ood import split_files  # noqa: E402
from pixclass import artifact as artifact_io  # noqa: E402
from pixclass.data.loaders import load_split  # noqa: E402
from pixclass.data.scan import scan_class_folders  # noqa: E402
from pixclass.data.transforms import batch_to_input  # noqa: E402
from pixclass.progress import Reporter  # noqa: E402

SPLITS = ("val", "test", "ood")


@torch.inference_mode()
def outputs(art, paths, labels):
    """(logits 2 x N x K, penultimate features 2 x N x D, labels N) for the image and its mirror."""
    grabbed = {}
    hook = art.model.head.register_forward_hook(lambda m, i, o: grabbed.__setitem__("f", i[0].float()))
    split, _ = load_split(paths, labels, art.preprocess, Reporter(quiet=True), max_memory_gb=8)
    logits, features, ys = [], [], []
    for images, y, _ in split.batches(500):
        x = batch_to_input(images, art.preprocess)
        views = [(art.model(v).float(), grabbed["f"]) for v in (x, x.flip(3))]
        logits.append(torch.stack([z for z, _ in views]))
        features.append(torch.stack([f for _, f in views]))
        ys.append(y)
    hook.remove()
    return torch.cat(logits, 1), torch.cat(features, 1), torch.cat(ys).numpy()


def run_outputs(run: Path, ood_paths: list[Path], train_limit: int) -> tuple:
    art = artifact_io.load(run / "model")
    art.model.eval()
    cache = run / f"bench_post_hoc_{len(ood_paths)}_{train_limit}.pt"
    if cache.is_file():
        return art, torch.load(cache, weights_only=False)
    out = {name: outputs(art, *split_files(run, art, name)) for name in ("val", "test")}
    paths, labels = split_files(run, art, "train")
    keep = np.sort(np.random.default_rng(1).choice(len(paths), min(train_limit, len(paths)), replace=False))
    out["train"] = outputs(art, [paths[i] for i in keep], [labels[i] for i in keep])
    out["ood"] = outputs(art, ood_paths, [0] * len(ood_paths))
    torch.save(out, cache)
    return art, out


def mahalanobis(train: np.ndarray, labels: np.ndarray, relative: bool):
    """A score function (higher: closer) from class means and a shared covariance (plus, relative,
    one Gaussian of all classes)."""
    means = np.stack([train[labels == c].mean(0) for c in np.unique(labels)])
    centred = train - means[labels]
    precision = np.linalg.pinv(centred.T @ centred / len(train) + 1e-6 * np.eye(train.shape[1]))
    mu0 = train.mean(0)
    precision0 = np.linalg.pinv((train - mu0).T @ (train - mu0) / len(train) + 1e-6 * np.eye(train.shape[1]))

    def score(q: np.ndarray) -> np.ndarray:
        d = np.stack([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means], 1)
        if relative:
            d = d - np.einsum("nd,de,ne->n", q - mu0, precision0, q - mu0)[:, None]
        return -d.min(1)
    return score


def scores_of(art, out) -> dict[str, dict[str, np.ndarray]]:
    t = art.temperature
    head = art.model.head.weight.float().detach() * art.model.output_scale
    train, train_labels = out["train"][1].mean(0), out["train"][2]
    unit_train = F.normalize(train, dim=1)

    def per_split(fn):
        return {s: np.asarray(fn(*out[s][:2])) for s in SPLITS}
    result = {"max probability": per_split(lambda z, f: F.softmax(z / t, 2).mean(0).max(1).values),
              "max logit": per_split(lambda z, f: z.mean(0).max(1).values),
              "energy": per_split(lambda z, f: torch.logsumexp(z / t, 2).mean(0))}
    for k in (1, 10, 50):
        result[f"kNN, k {k}"] = per_split(
            lambda z, f, k=k: (F.normalize(f.mean(0), dim=1) @ unit_train.T).topk(k, dim=1).values[:, -1])
    for name, rows, view in (("raw", train, lambda f: f.mean(0)),
                             ("normalized", unit_train, lambda f: F.normalize(f.mean(0), dim=1))):
        for relative in (False, True):
            score = mahalanobis(rows.double().numpy(), train_labels, relative)
            label = f"{'relative ' if relative else ''}Mahalanobis, {name} features"
            result[label] = per_split(lambda z, f, s=score, v=view: s(v(f).double().numpy()))
    for pct in (80, 90, 95):
        clip = float(torch.quantile(train.flatten(), pct / 100))
        result[f"ReAct {pct}th percentile, energy"] = per_split(
            lambda z, f, c=clip: torch.logsumexp((f.clamp(max=c) @ head.T) / t, 2).mean(0))
    return result


def rate(score: dict[str, np.ndarray], keep: float = 0.95) -> dict:
    """AUROC of test vs OOD; at the threshold keeping `keep` of val, the share of each below it."""
    threshold = float(np.quantile(score["val"], 1 - keep))
    truth = np.r_[np.ones(len(score["test"])), np.zeros(len(score["ood"]))]
    return {"auroc": round(float(roc_auc_score(truth, np.r_[score["test"], score["ood"]])), 4),
            "test_unknown": round(float((score["test"] < threshold).mean()), 4),
            "ood_unknown": round(float((score["ood"] < threshold).mean()), 4)}


def rank_average(*scores: dict) -> dict:
    """The mean of the scores' ranks over all images of all splits (they live on different scales)."""
    ranks = [rankdata(np.concatenate([s[n] for n in SPLITS])) for s in scores]
    total = sum(ranks) / len(ranks)
    bounds = np.cumsum([0] + [len(scores[0][n]) for n in SPLITS])
    return {n: total[bounds[i]:bounds[i + 1]] for i, n in enumerate(SPLITS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--ood", type=Path, required=True)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ood_paths = sorted(p for files in scan_class_folders(args.ood, []).values() for p in files)
    result, per_run = {}, []
    for run in args.runs:
        art, out = run_outputs(run, ood_paths, args.train_limit)
        scores = scores_of(art, out)
        for a, b in (("energy", "kNN, k 10"), ("max logit", "kNN, k 1"),
                     ("energy", "relative Mahalanobis, raw features")):
            scores[f"rank average: {a} + {b}"] = rank_average(scores[a], scores[b])
        accuracy = float((out["test"][0].mean(0).argmax(1).numpy() == out["test"][2]).mean())
        result[str(run)] = {"temperature": art.temperature, "test_accuracy": round(accuracy, 4),
                            "scores": {name: rate(s) for name, s in scores.items()}}
        per_run.append((art, out))
    if len(per_run) > 1:
        def ensemble(fn):
            return {s: sum(np.asarray(fn(art, out[s][0])) for art, out in per_run) for s in SPLITS}
        probs = ensemble(lambda art, z: F.softmax(z / art.temperature, 2).mean(0))
        labels = per_run[0][1]["test"][2]
        result["ensemble"] = {
            "test_accuracy": round(float((probs["test"].argmax(1) == labels).mean()), 4),
            "scores": {"max probability": rate({s: p.max(1) for s, p in probs.items()}),
                       "energy": rate(ensemble(lambda art, z: torch.logsumexp(z / art.temperature, 2).mean(0)))}}
    print_json(result, args.json)


if __name__ == "__main__":
    main()
