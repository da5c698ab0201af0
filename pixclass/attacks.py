"""Adversarial attacks from the Adversarial Robustness Toolbox (ART), in pixel space.

An attack's ε is a change of pixel values in [0, 1] (ε = 8/255: eight grey levels), so the
network ART attacks is the artifact's model behind its own standardization (`PixelSpaceModel`):
the same ε means the same thing for every model whatever its mean and std. ART is imported only
here, and only when an attack runs: `pixclass --help`, predict and plain training never load it.

Every evaluation of a model under attack goes through here (`pixclass robustness`, and the
PGD accuracy a `--adversarial` run reports); the attack that adversarial training steps learn
from is train/adversarial.py's (why it is not ART's: there)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data.transforms import Preprocess, normalize
from .tta import probabilities as tta_probabilities

ATTACKS = ("fgsm", "pgd")
PGD_STEPS = 10


class PixelSpaceModel(nn.Module):
    """Pixels in [0, 1] -> logits: the standardization of `pre`, then the network (with the
    artifact's test-time augmentation: then the log of its averaged probabilities, whose softmax
    is what every backend answers)."""

    def __init__(self, model: nn.Module, pre: Preprocess, tta: str = "none"):
        super().__init__()
        self.model, self.pre, self.tta = model, pre, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.pre)
        if self.tta == "none":
            return self.model(x)
        return tta_probabilities(self.model, x, self.tta).clamp_min(1e-12).log()


def art_classifier(model: nn.Module, pre: Preprocess, n_classes: int, tta: str = "none", device=None):
    """ART's view of `model` on pixels in [0, 1] (`clip_values`: no attack leaves that range)."""
    from art.estimators.classification import PyTorchClassifier
    device = torch.device(device or next(model.parameters()).device)
    classifier = PyTorchClassifier(model=PixelSpaceModel(model, pre, tta), loss=nn.CrossEntropyLoss(),
                                   input_shape=(pre.channels, pre.size, pre.size), nb_classes=n_classes,
                                   clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")
    if device.type == "cuda":  # ART picks the current CUDA device; a DDP rank's own is the model's
        classifier._device = device
    return classifier


def make_attack(classifier, name: str, eps: float, batch_size: int = 128, steps: int = PGD_STEPS):
    """ART's L∞ FGSM, or PGD with `steps` steps of ε/4 from a random start in the ε-ball."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    if name == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=eps, eps_step=eps, batch_size=batch_size)
    if name == "pgd":
        return ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=steps,
                                               num_random_init=1, batch_size=batch_size, verbose=False)
    raise ValueError(f"unknown attack {name!r} (one of {', '.join(ATTACKS)})")


def to_pixels(images_uint8: torch.Tensor) -> np.ndarray:
    """uint8 N x C x H x W -> float32 pixels in [0, 1], what ART attacks."""
    return images_uint8.float().div_(255.0).numpy()


def predicted(model: PixelSpaceModel, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities N x K of pixel images (float32 in [0, 1])."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            out.append(torch.softmax(model(torch.from_numpy(pixels[start:start + batch_size])).float(), 1))
    return torch.cat(out).numpy()


def adversarial_examples(classifier, name: str, eps: float, pixels: np.ndarray, labels: np.ndarray,
                         steps: int = PGD_STEPS, on_batch=None, batch_size: int = 64) -> np.ndarray:
    """The attack's images of `pixels` (attacked against their true `labels`), batch by batch so
    `on_batch(n)` can report progress."""
    attack = make_attack(classifier, name, eps, batch_size, steps)
    out = np.empty_like(pixels)
    for start in range(0, len(pixels), batch_size):
        end = start + batch_size
        out[start:end] = attack.generate(pixels[start:end], y=labels[start:end])
        if on_batch is not None:
            on_batch(len(out[start:end]))
    return out


def attack_accuracy(model: nn.Module, pre: Preprocess, n_classes: int, images_uint8: torch.Tensor,
                    labels: np.ndarray, name: str = "pgd", eps: float = 2 / 255, tta: str = "none",
                    steps: int = PGD_STEPS) -> float:
    """Top-1 accuracy on the attack's versions of `images_uint8` (N x C x H x W)."""
    model = model.eval()
    classifier = art_classifier(model, pre, n_classes, tta)
    labels = np.asarray(labels)
    attacked = adversarial_examples(classifier, name, eps, to_pixels(images_uint8), labels, steps)
    probs = predicted(PixelSpaceModel(model, pre, tta), attacked)
    return float((probs.argmax(1) == labels).mean())
