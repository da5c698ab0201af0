"""Time to accuracy of `pixclass train --recipe fast` on CIFAR-10 (50k train, 10k test JPEGs).

The test set is given as the validation split, so each epoch's (un-augmented) test accuracy is
logged with the elapsed time; the final figure uses test-time augmentation. Several seeds give a
mean and spread. usage: python bench/fast_recipe.py [--seeds 1] [--epochs 10] [--model airbench-wide] [--work DIR]"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, extract, pixclass_cmd, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the network's own (10, or 15 for airbench-wide)")
    parser.add_argument("--model", default="airbench", help="airbench (airbench94's network) or airbench-wide (airbench95's)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pixclass-bench-"))
    cifar = extract(SHARED / "datasets" / "cifar10-jpg.tar.gz", work / "data") / "cifar10"
    layout = work / "cifar10-test-as-val"
    layout.mkdir(exist_ok=True)
    for name, target in (("train", "train"), ("val", "test")):
        if not (layout / name).exists():
            (layout / name).symlink_to(cifar / target)
    results = []
    for seed in range(args.seeds):
        out = work / f"fast-{args.model}-seed{seed}"
        epochs = ["--epochs", args.epochs] if args.epochs else []
        seconds, text = timed(pixclass_cmd("train", layout, "--recipe", "fast", "--model", args.model, *epochs, "--seed",
                                           seed, "--out", out, "--json", "--quiet"),
                              env={"PIXCLASS_CACHE_DIR": str(work / "cache")})
        summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
        history = list(csv.DictReader(open(out / "metrics.csv")))
        to90 = next((float(r["elapsed_s"]) for r in history if float(r["val_accuracy"]) >= 0.90), None)
        to93 = next((float(r["elapsed_s"]) for r in history if float(r["val_accuracy"]) >= 0.93), None)
        m = summary["metrics"]
        results.append((m["accuracy"], m["accuracy_without_tta"], seconds, to90, to93))
        print(f"seed {seed}: test acc {m['accuracy']:.4f} with TTA ({m['accuracy_without_tta']:.4f} without), "
              f"whole command {seconds / 60:.1f} min, training to 90%: "
              f"{'%.1f min' % (to90 / 60) if to90 else 'not reached'}, to 93% (no TTA): "
              f"{'%.1f min' % (to93 / 60) if to93 else 'not reached'}", flush=True)
        for r in history:
            print(f"  epoch {r['epoch']}: {float(r['elapsed_s']) / 60:5.1f} min, test acc (no TTA) "
                  f"{float(r['val_accuracy']):.4f}, {float(r['images_per_s']):.0f} img/s")
    accs = [r[0] for r in results]
    spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
    print(f"fast recipe, {args.model}, {args.epochs or 'default'} epochs, {len(results)} seed(s): "
          f"test accuracy {statistics.mean(accs):.4f}{spread}, "
          f"whole command {statistics.mean(r[2] for r in results) / 60:.1f} min (target: >= 0.93 in <= 60 min)")


if __name__ == "__main__":
    main()
