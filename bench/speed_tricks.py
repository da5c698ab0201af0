"""What each of pixclass's speed tricks saves on the default transfer run (ants/bees, EfficientNet-Lite0,
empty feature cache): the run as it is, against copies of this checkout with one trick taken out.

The tricks, each in one place (README, "How it is built"):
- figure worker: run_training draws the report's figures in a worker process (plot_worker.py);
  without it they are drawn in the main process;
- decode ahead: the transfer recipe decodes the images while the model is built
  (TransferRecipe.start_early); without it decoding starts when the features are computed;
- quick exit: the `pixclass` command skips interpreter teardown (cli.run); without it, sys.exit.

Each variant is a copy of pixclass/ with one line changed (PATCHES below), run as a whole command
`python -m pixclass train DATA` with an empty cache, `--repeats` times, alternating variants so that
a noisy neighbour hits them alike. Prints the median seconds and the difference to the full run.
usage: python bench/speed_tricks.py [--work DIR] [--repeats 5]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, extract, timed  # noqa: E402

# variant -> (file in pixclass/, the line as it is, the line without the trick)
PATCHES = {
    "no figure worker": ("train/run.py", "plotter = plotter_for_run(enabled=dist.main)",
                         "plotter = plotter_for_run(enabled=False)"),
    "no decode ahead": ("train/recipes/transfer.py", "if pre is None or dist.enabled:", "if True:"),
    "no quick exit": ("cli.py", "    os._exit(code or 0)", "    sys.exit(code or 0)"),
}


def variant_copy(name: str, work: Path) -> Path:
    """A folder holding a copy of pixclass/ with the variant's line changed."""
    root = work / name.replace(" ", "-")
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(ROOT / "pixclass", root / "pixclass", ignore=shutil.ignore_patterns("__pycache__"))
    file, before, after = PATCHES[name]
    path = root / "pixclass" / file
    text = path.read_text()
    if text.count(before) != 1:
        sys.exit(f"{file}: the line to change is not there exactly once: {before!r} (update PATCHES)")
    path.write_text(text.replace(before, after))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for data, copies and runs (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pixclass-tricks-"))
    data = extract(SHARED / "datasets" / "hymenoptera.tar.gz", work / "data") / "hymenoptera"
    roots = {"as it is": ROOT, **{name: variant_copy(name, work) for name in PATCHES}}
    seconds: dict[str, list[float]] = {name: [] for name in roots}
    accuracy = {}
    for repeat in range(args.repeats):
        for name, root in roots.items():
            cache = Path(tempfile.mkdtemp(prefix="pixclass-cache-", dir=work))
            env = {"PIXCLASS_CACHE_DIR": str(cache), "PYTHONPATH": str(root)}
            s, out = timed([sys.executable, "-m", "pixclass", "train", str(data), "--out",
                            str(work / "runs" / f"{name}-{repeat}".replace(" ", "-")), "--json", "--quiet"], env=env)
            shutil.rmtree(cache)
            seconds[name].append(s)
            accuracy[name] = json.loads(out[out.index("{"):out.rindex("}") + 1])["metrics"]["accuracy"]
    base = statistics.median(seconds["as it is"])
    print(f"pixclass train hymenoptera (default model, empty cache), median of {args.repeats}, "
          f"{os.cpu_count()} CPUs")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:18s} {median:6.2f} s  ({'+' if median >= base else ''}{median - base:.2f} s)  "
              f"runs {', '.join(f'{v:.2f}' for v in values)}  val_acc {accuracy[name]:.4f}")


if __name__ == "__main__":
    main()
