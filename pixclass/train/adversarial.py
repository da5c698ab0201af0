"""The adversarial batches `--adversarial` training learns from: fast FGSM with a random start
("Fast is better than free", Wong, Rice & Kolter 2020): from a uniform random point of the L∞
ε-ball around each image, one signed-gradient step of 1.25 ε, projected back onto the ball and
onto valid pixels. ε is in pixel units (before the model's standardization), as in attacks.py.

Why a few lines of PyTorch rather than ART's attack (which evaluation uses, attacks.py): ART's
`generate` takes and returns NumPy arrays (a device round trip per step on a GPU), runs the
network in eval mode (BatchNorm on running statistics, not the batch's, unlike the method), draws
its random start from NumPy's global generator (the loop's seeded per-epoch generator could not
make a resumed run repeat it), and computes a success rate for its log on every call, two more
forward passes per step (the cost of a step each way: bench/RESULTS.md, "Robustness")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Preprocess, normalize

STEP = 1.25  # the step, in ε, of Wong et al.'s fast FGSM


class FastAdversary:
    """Standardized training batch -> its fast-FGSM version (standardized, same device and layout)."""

    def __init__(self, model: nn.Module, pre: Preprocess, eps: float):
        self.model, self.pre, self.eps = model, pre, eps

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = torch.tensor(self.pre.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.pre.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        pixels = (x.detach() * std + mean).clamp_(0, 1)
        start = (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(self.eps).to(x.device)
        delta = ((pixels + start).clamp_(0, 1) - pixels).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(self.model(normalize(pixels + delta, self.pre)).float(), labels)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + STEP * self.eps * grad.sign()).clamp_(-self.eps, self.eps)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return normalize((pixels + delta).clamp_(0, 1), self.pre).contiguous(memory_format=layout)
