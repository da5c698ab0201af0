"""The end of a multi-label run: one decision threshold per class, the one with the best F1 on the
validation split, for the final network as the artifact runs it (its test-time augmentation
included). In place of calibration: a temperature rescales one softmax over the classes, and the
abstain threshold reads that softmax; a multi-label model has neither, so both are skipped."""

from __future__ import annotations

from ..metrics import DEFAULT_THRESHOLD, tune_thresholds
from ..progress import Reporter
from .recipes.held_out import held_out_on_images


def fit_thresholds(model, data, tta: str, reporter: Reporter) -> list[float]:
    """Per-class thresholds tuned on `data.val`; DEFAULT_THRESHOLD for every class without one."""
    reporter.info("multi-label: no temperature scaling or abstain threshold (they apply to one softmax over the "
                  "classes); thresholds per label tuned on validation instead")
    if data.val is None or len(data.val) == 0:
        reporter.warn(f"no validation split: every label's threshold stays {DEFAULT_THRESHOLD} "
                      "(--split 0.8,0.2,0 keeps some images to tune them on)")
        return [DEFAULT_THRESHOLD] * len(data.classes)
    val = held_out_on_images(model, data, {"val": data.val}, tta=tta)
    thresholds = tune_thresholds(val.labels, val.probabilities)
    shown = ", ".join(f"{c} {t:.2f}" for c, t in list(zip(data.classes, thresholds))[:10])
    reporter.info(f"label thresholds (best F1 on {len(val.labels)} validation images): {shown}"
                  + (" ..." if len(thresholds) > 10 else ""))
    return thresholds
