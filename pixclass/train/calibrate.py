"""The end of every training run, whatever the recipe: the calibration temperature and the
abstain threshold, both fitted on the validation split with the final network as the artifact
will run it (its test-time augmentation included), and the held-out split's probabilities as the
calibrated artifact gives them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..abstain import Abstain, fit_abstain
from ..calibration import fit_temperature
from ..data.dataset import PathSplit
from ..data.loaders import load_split
from ..inference import logits_of_batches
from ..progress import Reporter
from ..tta import combine_views


@dataclass
class Calibrated:
    temperature: float
    abstain: Abstain | None
    held_out: np.ndarray | None  # the held-out split's probabilities at `temperature`, in its order


def calibrate(model, data, tta: str, held_split: str | None, reporter: Reporter, max_memory_gb: float,
              batch_size: int = 128) -> Calibrated | None:
    """None without a validation split (the model stays uncalibrated and never answers unknown)."""
    if data.val is None or len(data.val) == 0:
        reporter.warn("no validation split: the probabilities stay uncalibrated and the model never answers "
                      "unknown (both are fitted on validation images; --split 0.8,0.2,0 keeps some)")
        return None

    def logits(split):
        if isinstance(split, PathSplit):  # a recipe that did not decode it (cached features)
            split, _ = load_split(split.paths, split.labels, data.preprocess, Reporter(quiet=True), max_memory_gb)
        return logits_of_batches(model, data.preprocess, split.batches(batch_size), tta)

    val_logits, val_labels = logits(data.val)
    temperature = fit_temperature(val_logits, val_labels)
    abstain = fit_abstain(combine_views(val_logits, temperature).numpy())
    held_out = None
    if held_split == "val":
        held_out = combine_views(val_logits, temperature).numpy()
    elif held_split is not None:
        held_out = combine_views(logits(getattr(data, held_split))[0], temperature).numpy()
    reporter.info(f"calibration: temperature {temperature:.3f}; unknown below {abstain.method.replace('_', ' ')} "
                  f"{abstain.threshold:.3f} (keeps {abstain.keep:.0%} of the validation images)")
    return Calibrated(temperature, abstain, held_out)
