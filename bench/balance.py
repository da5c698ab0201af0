"""The imbalance autopilot on CIFAR-10 (issue 19, acceptance 2): two classes at 20:1 in training,
scored on a balanced test set, `--balance auto` against `--balance off`, over several seeds.

Builds train/MAJOR (1,000 images) and train/MINOR (50) and test/ with 1,000 of each (--test-per-class) (symlinks to
CIFAR-10's JPEGs), then runs `pixclass train DATA --balance MODE --seed S` for each mode and seed
(the recipe `auto` picks: the fast one for 32 px images) and reads the minority class's recall
and the macro-F1 from each run's evaluation/metrics.json. Prints one JSON document: per run, and
the mean per mode with the differences in points.

usage: python bench/balance.py CIFAR_DIR [--major cat] [--minor dog] [--seeds 0,1,2] [--test-per-class 1000]
       [--extra ARGS]"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(cifar: Path, dest: Path, major: str, minor: str, n_major: int, n_minor: int, n_test: int) -> Path:
    for split, counts in (("train", {major: n_major, minor: n_minor}), ("test", {major: n_test, minor: n_test})):
        for cls, n in counts.items():
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((cifar / split / cls).iterdir())[:n]:
                (dest / split / cls / f.name).symlink_to(f.resolve())
    return dest


def run(data: Path, out: Path, mode: str, seed: int, minor: str, extra: list[str]) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixclass", "train", str(data), "--balance", mode, "--seed", str(seed),
                    "-q", "--json", "--out", str(out), *extra], check=True, capture_output=True, text=True)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    recall = next(c["recall"] for c in metrics["per_class"] if c["class"] == minor)
    return {"mode": mode, "seed": seed, "minority_recall": recall, "macro_f1": metrics["macro_f1"],
            "accuracy": metrics["accuracy"], "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cifar", type=Path, help="CIFAR-10 with train/ and test/ class folders")
    parser.add_argument("--major", default="cat")
    parser.add_argument("--minor", default="dog")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--extra", default="", help="more `pixclass train` options, e.g. '--recipe fast'")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = build(args.cifar, Path(tmp) / "imbalanced", args.major, args.minor, 1000, 50, args.test_per_class)
        for seed in seeds:
            for mode in ("off", "auto"):
                runs.append(run(data, Path(tmp) / f"{mode}-{seed}", mode, seed, args.minor, shlex.split(args.extra)))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    mean = {mode: {k: round(statistics.mean(r[k] for r in runs if r["mode"] == mode), 4)
                   for k in ("minority_recall", "macro_f1", "accuracy", "seconds")} for mode in ("off", "auto")}
    gain = {k: round(100 * (mean["auto"][k] - mean["off"][k]), 1) for k in ("minority_recall", "macro_f1")}
    print(json.dumps({"runs": runs, "mean": mean, "auto_minus_off_points": gain}, indent=2))


if __name__ == "__main__":
    main()
