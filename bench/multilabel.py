"""Issue 22, acceptance 5: multi-label pairs of CIFAR-10 images (two JPEGs side by side, 64x32,
both labels; tests/conftest.make_multilabel_pairs) trained with the classic CNN, its test split's
macro-F1 and mAP beside the macro-F1 of answering every label (what a model that learned nothing
but the thresholds can reach), and the ONNX export verified.

    python bench/multilabel.py --source /tmp/d/cifar10/train --classes airplane,automobile,frog,horse,ship \
        --pairs 6000 --work /tmp/ml-bench -- --image-size 32 --augment none --epochs 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH.parent))

from common import timed  # noqa: E402


def every_label_macro_f1(metrics_json: Path) -> float:
    """Macro-F1 of answering every label for every image, on the same evaluated images."""
    per_class = json.loads(metrics_json.read_text())["per_class"]
    n = json.loads(metrics_json.read_text())["n"]
    f1 = [2 * (c["support"] / n) / (1 + c["support"] / n) for c in per_class if c["support"]]
    return float(np.mean(f1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, required=True, help="CIFAR-10 class folders (train/)")
    parser.add_argument("--classes", default="", help="comma-separated; default: every class folder")
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--per-class", type=int, default=5000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("train_args", nargs="*", help="after --: passed to pixclass train")
    args = parser.parse_args()
    from conftest import make_multilabel_pairs
    classes = args.classes.split(",") if args.classes else sorted(d.name for d in args.source.iterdir() if d.is_dir())
    labels = args.work / "data" / "labels.csv"
    if not labels.is_file():
        make_multilabel_pairs(args.source, args.work / "data", classes, args.pairs, per_class=args.per_class)
    run = args.work / "run"
    py = [sys.executable, "-m", "pixclass"]
    seconds, _ = timed(py + ["train", str(labels), "--out", str(run), *args.train_args])
    m = json.loads((run / "evaluation" / "metrics.json").read_text())
    _, out = timed(py + ["export", str(run / "model"), "--format", "onnx", "--json",
                         "--out", str(args.work / "model.onnx")])
    verified = json.loads(out[out.index("{"):])
    print(f"{len(classes)} classes, {args.pairs} pairs; test {m['n']} pairs: macro-F1 {m['macro_f1']:.4f} "
          f"(every label answered: {every_label_macro_f1(run / 'evaluation' / 'metrics.json'):.4f}), "
          f"micro-F1 {m['micro_f1']:.4f}, mAP {m['mAP']:.4f}, exact match {m['accuracy']:.4f}; train {seconds:.0f} s")
    for c in m["per_class"]:
        print(f"  {c['class']:<12} P {c['precision']:.3f} R {c['recall']:.3f} F1 {c['f1']:.3f} "
              f"AP {c['average_precision']:.3f} threshold {c['threshold']:.3f} support {c['support']}")
    print(f"ONNX export: {'PASS' if verified['passed'] else 'FAIL'}, label-set agreement {verified['agreement']:.4f} "
          f"on {verified['n']} images, max |p difference| {verified['max_prob_diff']:.1e}")
    print(f"RESULT macro_f1={m['macro_f1']:.4f} map={m['mAP']:.4f} onnx_passed={verified['passed']}")


if __name__ == "__main__":
    main()
