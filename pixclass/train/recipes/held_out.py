"""The held-out probabilities a recipe hands back, computed from decoded images through the
inference backend (so they are what `pixclass evaluate` would compute on the saved model)."""

from __future__ import annotations

from ...inference import TorchBackend, predict_batches
from ...tta import combine_views
from ..calibrate import ScoresOnImages
from . import HeldOut, held_out_split


def held_out_on_images(model, data, splits: dict | None = None, batch_size: int = 64,
                       tta: str = "none") -> HeldOut | None:
    """`splits`: decoded splits by name (default: the data's own). `tta`: the test-time
    augmentation the recipe's FitResult names."""
    name, split = held_out_split(splits or {"val": data.val, "test": data.test})
    if split is None:
        return None
    backend = TorchBackend(model, data.classes, data.preprocess, tta, multilabel=data.multilabel)
    probs, labels, _ = predict_batches(backend, split.batches(batch_size))
    return HeldOut(name, probs, labels, list(getattr(split, "paths", [])))


def held_out_and_scores(model, data, tta: str, max_memory_gb: float):
    """(the held-out probabilities as the saved model gives them, on the `tta` views in float32;
    the calibrate.ScoresOnImages that computed them). Calibration reads the same scores instead of
    running the network over the held-out images again. Single-label models (a multi-label run
    fits thresholds, not a temperature: held_out_on_images)."""
    scores = ScoresOnImages(model, data, max_memory_gb)
    name, split = held_out_split({"val": data.val, "test": data.test})
    if split is None:
        return None, scores
    logits, _, labels = scores.split(name, tta)
    return HeldOut(name, combine_views(logits).numpy(), labels, list(getattr(split, "paths", []))), scores


def adversarial_held_out(model, data, eps_255: float, reporter=None, limit: int = 1000) -> dict:
    """The model's accuracy on (up to `limit` of) the held-out images under PGD at `eps_255`/255:
    what adversarial training bought, for the run's metrics and report."""
    import torch

    from ...attacks import PGD_STEPS, attack_accuracy
    name, split = held_out_split({"val": data.val, "test": data.test})
    images, labels = [], []
    for x, y, _ in split.batches(256):
        images.append(x)
        labels.append(y)
        if sum(len(b) for b in labels) >= limit:
            break
    images, labels = torch.cat(images)[:limit], torch.cat(labels)[:limit].numpy()
    if reporter is not None:
        reporter.info(f"attacking {len(labels)} {name} images with PGD at ε={eps_255:g}/255")
    accuracy = attack_accuracy(model, data.preprocess, len(data.classes), images, labels, "pgd", eps_255 / 255)
    return {"attack": "PGD", "eps_255": eps_255, "steps": PGD_STEPS, "split": name, "n": int(len(labels)),
            "accuracy": accuracy}
