"""The learning-rate finder against a grid: `pixclass lr-find`'s suggestion for the classic CNN on a
CIFAR-10 subset, and the test accuracy of the same network trained at five fixed rates (and at the
suggestion) for the same epochs. Passes when the suggestion is within 3x of the grid's best rate.

usage: python bench/lr_find.py [--train-per-class 500] [--test-per-class 100] [--epochs 8] [--cifar DIR]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def subset(cifar: Path, dest: Path, per_class: dict) -> Path:
    """dest/{train,test}/CLASS/ holding links to the first N files of each class (sorted)."""
    for split, n in per_class.items():
        for folder in sorted((cifar / split).iterdir()):
            out = dest / split / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar", type=Path, default=Path("/tmp/d/cifar10"))
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import find_lr_in_process, run_training

    work = Path(tempfile.mkdtemp(prefix="lr-find-bench-"))
    data = subset(args.cifar, work / "cifar", {"train": args.train_per_class, "test": args.test_per_class})
    base = RunConfig(data=DataConfig(path=str(data), image_size=32), model=ModelConfig(name="classic-cnn"),
                     augment=AugmentConfig(policy="none"),
                     train=TrainConfig(epochs=args.epochs, recipe="scratch", threads=args.threads))
    started = time.perf_counter()
    _, finding = find_lr_in_process(base, Reporter(quiet=True))
    find_s = time.perf_counter() - started
    print(f"lr-find ({find_s:.0f}s): {finding.describe()}", flush=True)

    def test_accuracy(lr: float, name: str) -> float:
        summary = run_training(base.replace("train", lr=lr), out=work / name, reporter=Reporter(quiet=True))
        return summary["metrics"]["accuracy"]

    grid = {}
    for lr in GRID:
        grid[lr] = test_accuracy(lr, f"grid-{lr:g}")
        print(f"fixed lr {lr:.0e}: test accuracy {grid[lr]:.4f}", flush=True)
    best = max(grid, key=grid.get)
    at_suggestion = test_accuracy(finding.suggestion, "suggested")
    ratio = max(finding.suggestion, best) / min(finding.suggestion, best)
    print(f"suggested lr {finding.suggestion:.2e}: test accuracy {at_suggestion:.4f}")
    print(f"best of the grid: lr {best:.0e} (test accuracy {grid[best]:.4f}); suggestion within {ratio:.2f}x of it: "
          f"{'PASS' if ratio <= 3 else 'FAIL'} (minimum/10 would be {finding.minimum:.2e}, "
          f"{max(finding.minimum, best) / min(finding.minimum, best):.2f}x)")
    print(f"RESULT suggestion={finding.suggestion:.3g} best_grid_lr={best:g} ratio={ratio:.2f} "
          f"seconds={time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
