"""How small an ECE a held-out split of this size can show (issue 20, acceptance 1 on ants/bees).

ECE measured on a few hundred images is biased upwards: even a perfectly calibrated model, whose
images are right exactly as often as its confidence says, shows a positive ECE, because each
confidence bin holds few images. This bench trains the default model on DATA/train (its
validation split, where the temperature is fitted, is carved from train/ as usual) with DATA/val
held out as test/, for each seed, and prints
- the run's own held-out ECE before and after temperature scaling (calibration.json), and
- the ECE a perfectly calibrated model would show on the same held-out images: labels drawn
  right with probability equal to the model's calibrated confidence, ECE computed with the same
  15 bins (pixclass.metrics.calibration), over many draws (mean, and the 10th-90th percentiles).
It also prints the ECE at the "oracle" temperature, fitted (plain maximum likelihood) on the
held-out images themselves: the best temperature scaling could do on this split. If the run's ECE
is already inside the perfectly calibrated model's range, and the oracle does not halve it, no
temperature fitted on validation images can show a halving on this split.

usage: python bench/calibration_floor.py DATA [--seeds 0 1 2] [--draws 2000] [--work DIR]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import pixclass_cmd, timed  # noqa: E402

import torch  # noqa: E402

from pixclass.api import load  # noqa: E402
from pixclass.calibration import fit_temperature  # noqa: E402
from pixclass.data.scan import scan_class_folders  # noqa: E402
from pixclass.metrics import calibration  # noqa: E402


def perfectly_calibrated_ece(confidence: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """ECE of `draws` simulated label sets in which each image is right with probability equal to
    its confidence (a two-class stand-in: the top class is right or it is not)."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        right = rng.random(len(confidence)) < confidence
        probs = np.stack([confidence, 1 - confidence], axis=1)
        out[i] = calibration(np.where(right, 0, 1), probs)["ece"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a folder with train/ and val/ class folders")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=None, help="where runs go (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="calibration_floor_"))
    layout = work / "data"
    layout.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", "train"), ("test", "val")):
        link = layout / name
        if not link.exists():
            link.symlink_to((args.data / target).resolve())
    classes, files = zip(*[(c, p) for c, paths in scan_class_folders(layout / "test").items() for p in paths])
    print(f"{'seed':>4} {'T':>6} {'test acc':>8} {'ECE before':>10} {'ECE after':>9}   perfectly calibrated: mean [p10, p90]"
          "   oracle T: ECE")
    for seed in args.seeds:
        run = work / f"run_seed{seed}"
        if not (run / "calibration.json").is_file():
            timed(pixclass_cmd("train", layout, "--seed", seed, "--out", run, "--quiet"))
        cal = json.loads((run / "calibration.json").read_text())
        model = load(run / "model")
        index = {c: i for i, c in enumerate(model.classes)}
        probs = model.predict_proba([str(p) for p in files])
        labels = np.array([index[c] for c in classes])
        here = calibration(labels, probs)["ece"]
        floor = perfectly_calibrated_ece(probs.max(axis=1), args.draws)
        # the artifact's probabilities are softmax(z / T): T * log p recovers z up to a per-image constant
        logits = torch.from_numpy(cal["temperature"] * np.log(np.clip(probs, 1e-12, 1)))[None]
        oracle_t = fit_temperature(logits, labels, prior_sd=None)
        oracle = calibration(labels, torch.softmax(logits[0] / oracle_t, 1).numpy())["ece"]
        print(f"{seed:>4} {cal['temperature']:>6.3f} {(probs.argmax(1) == labels).mean():>8.4f} "
              f"{cal['before']['ece']:>10.4f} {cal['ece']:>9.4f}   {floor.mean():.4f} "
              f"[{np.quantile(floor, 0.1):.4f}, {np.quantile(floor, 0.9):.4f}]   {oracle_t:.3f}: {oracle:.4f}"
              f"   (ECE after, recomputed here: {here:.4f})")


if __name__ == "__main__":
    main()
