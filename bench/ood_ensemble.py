"""Near-OOD with several different models trained on the same split (issue 20, acceptance 2).

Each run is scored the way its artifact deploys it, with its own test-time views and temperature:
energy (T * logsumexp(logits / T), averaged over the views) and the knn_similarity of its own
penultimate features to the bank stored in the artifact. Then every pair of runs and all of them
together are combined by rank averages (the runs' scores live on different scales): of their
energies, of their kNN similarities, and of each one's better score. Models of different kinds (a
from-scratch airbench on 32 px, an ImageNet EfficientNet fine-tuned at 128 px) err on different
images, which is what an ensemble needs.

The runs must share the validation and test images (the same seed and carve, or `--manifest` of
the first): thresholds keep `--keep` of the validation images, as the deployed one does.

usage: python bench/ood_ensemble.py RUN_DIR RUN_DIR [...] --ood OOD_FOLDER [--json FILE]"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_json  # noqa: E402
from bench.calibration_ood import split_files  # noqa: E402
from bench.ood_post_hoc import SPLITS, rank_average, rate  # noqa: E402
from pixclass import artifact as artifact_io  # noqa: E402
from pixclass.data.loaders import load_split  # noqa: E402
from pixclass.data.scan import scan_class_folders  # noqa: E402
from pixclass.feature_bank import features_of_batches, nearest_similarity  # noqa: E402
from pixclass.progress import Reporter  # noqa: E402


def run_scores(run: Path, ood_paths: list[Path]) -> tuple[dict, np.ndarray, np.ndarray]:
    """({"energy"|"knn": {split: scores}}, test probabilities, test labels), cached in the run."""
    cache = run / f"bench_ensemble_{len(ood_paths)}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    art = artifact_io.load(run / "model")
    if art.feature_bank is None:
        raise SystemExit(f"{run}: its artifact has no feature bank (written before knn_similarity)")
    out, t = {"energy": {}, "knn": {}}, art.temperature
    labels = {}
    for split in SPLITS:
        paths, ys = (ood_paths, [0] * len(ood_paths)) if split == "ood" else split_files(run, art, split)
        data, _ = load_split(paths, ys, art.preprocess, Reporter(quiet=True), max_memory_gb=8)
        logits, features, labels[split] = features_of_batches(art.model, art.preprocess, data.batches(256), art.tta)
        out["energy"][split] = (t * torch.logsumexp(logits / t, 2)).mean(0).numpy()
        out["knn"][split] = nearest_similarity(features, art.feature_bank.float()).numpy()
        if split == "test":
            probs = torch.softmax(logits / t, 2).mean(0).numpy()
    result = (out, probs, np.asarray(labels["test"]), np.asarray(labels["val"]))
    torch.save(result, cache)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--ood", type=Path, required=True)
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ood_paths = sorted(p for files in scan_class_folders(args.ood, []).values() for p in files)
    per_run = {str(run): run_scores(run, ood_paths) for run in args.runs}
    first = next(iter(per_run.values()))
    for run, (_, _, test_labels, val_labels) in per_run.items():
        if not (np.array_equal(test_labels, first[2]) and np.array_equal(val_labels, first[3])):
            raise SystemExit(f"{run} was judged on other validation or test images than {args.runs[0]}")
    result = {}
    for run, (scores, probs, labels, _) in per_run.items():
        result[run] = {"test_accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
                       **{name: rate(s, args.keep) for name, s in scores.items()}}
    for size in range(2, len(per_run) + 1):
        for members in itertools.combinations(per_run, size):
            probs = sum(per_run[m][1] for m in members)
            name = " + ".join(Path(m).name for m in members)
            result[name] = {"test_accuracy": round(float((probs.argmax(1) == first[2]).mean()), 4),
                            **{f"rank average of {score}": rate(rank_average(*[per_run[m][0][score] for m in members]),
                                                                args.keep) for score in ("energy", "knn")},
                            "rank average of all": rate(rank_average(*[per_run[m][0][s] for m in members
                                                                   for s in ("energy", "knn")]), args.keep)}
    print_json(result, args.json)


if __name__ == "__main__":
    main()
