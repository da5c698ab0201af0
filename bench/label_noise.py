"""Label-error detection on CIFAR-10 with known wrong labels (issue 19, acceptance 1).

Builds class folders of symlinks to the first PER_CLASS training JPEGs of each class, moves a
seeded random FRACTION of them into another class (chosen at random), then runs
`pixclass audit DATA --labels` and scores its ranked suggestions against the flipped files: among
as many top suggestions as there are flipped files, precision and recall of the flipped ones
(equal by construction when there are that many suggestions). Also checks that no file of DATA
changed (SHA-256 of every file, before and after). A second run times the warm feature cache.
Prints one JSON document.

usage: python bench/label_noise.py CIFAR_TRAIN_DIR [--per-class 200] [--fraction 0.05] [--seed 0]"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_noisy_copy(source: Path, dest: Path, per_class: int, fraction: float, seed: int) -> set[str]:
    """Class folders of symlinks under `dest`, with round(fraction x total) of them filed under a
    wrong class (seeded); returns the names (class/file as filed) of the flipped ones."""
    rng = random.Random(seed)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    files = [(c, f) for c in classes for f in sorted((source / c).iterdir())[:per_class]]
    flipped = set(rng.sample(range(len(files)), round(fraction * len(files))))
    wrong = set()
    for i, (cls, f) in enumerate(files):
        filed = rng.choice([c for c in classes if c != cls]) if i in flipped else cls
        target = dest / filed / f"{cls}_{f.name}"  # the true class in the name: no two files collide
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f.resolve())
        if i in flipped:
            wrong.add(str(target))
    return wrong


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file (through symlinks) and the target of every symlink, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            key = str(p.relative_to(root))
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() + (f" -> {p.readlink()}" if p.is_symlink() else "")
    return out


def score(issues: list[dict], wrong: set[str]) -> dict:
    top = [i["path"] for i in issues[:len(wrong)]]
    hits = sum(p in wrong for p in top)
    return {"flipped": len(wrong), "suggestions": len(issues), "top_k": len(top), "hits": hits,
            "precision": round(hits / max(len(top), 1), 4), "recall": round(hits / max(len(wrong), 1), 4),
            "suggested_true_class": sum(1 for i in issues[:len(wrong)]
                                        if i["path"] in wrong and Path(i["path"]).name.startswith(i["suggested"] + "_"))}


def audit_labels(data: Path, out: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pixclass", "audit", str(data), "--labels", "--json", "-q",
                           "-o", str(out)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["label_issues"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="CIFAR-10 train/ (class folders of JPEGs)")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "noisy"
        wrong = build_noisy_copy(args.source, data, args.per_class, args.fraction, args.seed)
        before = tree_digest(data)
        cold, cold_s = audit_labels(data, Path(tmp) / "audit1")
        warm, warm_s = audit_labels(data, Path(tmp) / "audit2")
        result = {"images": len(before), **score(cold["issues"], wrong), "out_of_fold_accuracy":
                  cold["out_of_fold_accuracy"], "cold_s": round(cold_s, 1), "warm_s": round(warm_s, 1),
                  "cold_timings": cold["timings"], "warm_timings": warm["timings"],
                  "same_ranking_warm": [i["path"] for i in cold["issues"]] == [i["path"] for i in warm["issues"]],
                  "data_unchanged": tree_digest(data) == before}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
