"""Memory and time against the dataset's size (issue 18): class-folder datasets of N images built
from the CIFAR-10 JPEGs (repeated with small seeded perturbations, re-encoded, so every file is
new to the caches), then `pixclass train` (by default as a user runs it, with 2 epochs: the fast
recipe, for images this small) and `pixclass predict` on each, in fresh processes with a fresh
cache. Prints, per size, the peak resident memory of the largest process
of each command (its own or a DataLoader worker's: wait4's rusage covers the reaped descendants)
and its seconds per image.

    python bench/scale.py --sizes 10000,50000,200000 --work /tmp/scale
    python bench/scale.py --sizes 5000,20000 --train-args "--recipe transfer --epochs 1" --work /tmp/scale-t
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import pixclass_cmd

CIFAR_TRAIN = Path("/tmp/d/cifar10/train")


def build_dataset(source: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """n images in source's classes (an equal share each): the originals first (linked), then
    copies shifted by a pixel and brightened or darkened a little, saved as new JPEGs."""
    from PIL import Image, ImageEnhance
    marker = dest / ".complete"
    if marker.exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    rng = random.Random(seed)
    for c, cls in enumerate(classes):
        files = sorted((source / cls).iterdir())
        (dest / cls).mkdir(parents=True)
        share = n // len(classes) + (c < n % len(classes))
        for i in range(share):
            original = files[i % len(files)]
            copy = i // len(files)
            target = dest / cls / f"{copy}_{original.name}"
            if copy == 0:
                os.symlink(original.resolve(), target)
                continue
            img = Image.open(original).convert("RGB")
            shift = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
            img = img.rotate(0, translate=shift)
            img = ImageEnhance.Brightness(img).enhance(1 + rng.uniform(-0.08, 0.08))
            img.save(target, quality=92)
    marker.touch()
    return dest


def measured(cmd: list, env: dict, stdout=subprocess.DEVNULL) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB of the largest process of the command's tree, its stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=stdout, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        err.seek(0)
        log = err.read()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log[-3000:]}")
    return elapsed, usage.ru_maxrss * 1024 / 2**30, log


def predict_has_out() -> bool:
    helptext = subprocess.run(pixclass_cmd("predict", "--help"), capture_output=True, text=True).stdout
    return "--out" in helptext


def run_size(n: int, work: Path, train_args: list[str], predict: bool = True) -> dict:
    data = build_dataset(CIFAR_TRAIN, work / f"data-{n}", n)
    cache = work / f"cache-{n}"  # fresh per size: every feature is computed, as on a new dataset
    shutil.rmtree(cache, ignore_errors=True)
    run = work / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "PIXCLASS_CACHE_DIR": str(cache)}
    train_s, train_gb, log = measured(pixclass_cmd("train", data, *train_args, "--out", run), env)
    notes = [line for line in log.splitlines() if line.startswith(("plan:", "memory:", "fast recipe:"))
             or "read from the cache per batch" in line]
    result = {"n": n, "train_s": train_s, "train_gb": train_gb, "notes": notes}
    if not predict:
        return result
    out = work / f"predictions-{n}.csv"
    if predict_has_out():
        predict_s, predict_gb, _ = measured(pixclass_cmd("predict", run / "model", data, "--out", out), env)
    else:
        with open(out, "w") as f:
            predict_s, predict_gb, _ = measured(pixclass_cmd("predict", run / "model", data, "--format", "csv"), env,
                                                stdout=f)
    with open(out, newline="") as f:  # one row per image and rank of the top-k: the paths are what count
        predicted = {row[0] for row in csv.reader(f)} - {"path"}
    if len(predicted) != n:
        sys.exit(f"predict wrote rows for {len(predicted)} of {n} images ({out})")
    return {**result, "predict_s": predict_s, "predict_gb": predict_gb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000,200000", help="comma-separated dataset sizes")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pixclass-scale",
                    help="where the datasets, caches and runs go (datasets are kept for the next call)")
    ap.add_argument("--train-args", default="--epochs 2",
                    help="what `pixclass train DATA` is given besides --out")
    ap.add_argument("--no-predict", action="store_true", help="time training only")
    args = ap.parse_args()
    if not CIFAR_TRAIN.is_dir():
        sys.exit(f"CIFAR-10 JPEGs not found in {CIFAR_TRAIN}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        r = run_size(n, args.work, args.train_args.split(), predict=not args.no_predict)
        results.append(r)
        for note in r["notes"]:
            print(f"  {n}: {note}", flush=True)
        line = f"{n:>8} images  train peak {r['train_gb']:.2f} GB, {r['train_s'] / n * 1000:.2f} ms/image"
        if "predict_s" in r:
            line += f"  predict peak {r['predict_gb']:.2f} GB, {r['predict_s'] / n * 1000:.2f} ms/image"
        print(line, flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        ratios = [f"{c}_peak_ratio={last[f'{c}_gb'] / first[f'{c}_gb']:.2f} "
                  f"{c}_time_per_image_ratio={(last[f'{c}_s'] / last['n']) / (first[f'{c}_s'] / first['n']):.2f}"
                  for c in ("train", "predict") if f"{c}_s" in last]
        print(f"RESULT sizes={first['n']}..{last['n']} " + " ".join(ratios))


if __name__ == "__main__":
    main()
