"""The fast from-scratch network for small images, in the style of airbench (Keller Jordan's
CIFAR-10 speedruns): a frozen patch-whitening first layer, three conv groups with BatchNorm and
GELU, global max pooling, a bias-free linear layer with a fixed output scale."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from .registry import ArchKwargs, ModelFamily, Width


def _bn(width: int) -> nn.BatchNorm2d:
    # airbench's BatchNorm: running stats follow the batches quickly (0.6 keep), no learned scale
    bn = nn.BatchNorm2d(width, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 convolution whose first `cin` filters start as the identity (as in airbench): the
    network begins close to passing its input through, which trains faster."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(_conv(cin, cout), nn.MaxPool2d(2), _bn(cout), nn.GELU(),
                         _conv(cout, cout), _bn(cout), nn.GELU())


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, widths=(64, 256, 256), whiten_kernel: int = 2,
                 output_scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * whiten_kernel ** 2, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by `init_whitening`, never trained
        groups, cin = [], self.whiten.out_channels
        for w in widths:
            groups.append(ConvGroup(cin, w))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.output_scale = output_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Filters that whiten the 2x2 (kernel-size) patches of standardized training images:
        the covariance's eigenvectors scaled by 1/sqrt(eigenvalue), with their negatives."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N C H' W' k k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).view(-1, images.shape[1], k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x C x H x W -> N x classes (logits)
        # the whitening layer in float32 even under bfloat16 autocast: its filters scale the
        # differences between neighbouring pixels by up to 1/sqrt(eps) (~45), and bfloat16's 8-bit
        # mantissa would round those small differences away before they are amplified
        with torch.autocast(x.device.type, enabled=False):
            x = nn.functional.gelu(self.whiten(x.float()))
        x = self.pool(self.groups(x)).flatten(1)
        return self.head(x) * self.output_scale


class AirbenchKwargs(ArchKwargs):
    widths: Annotated[list[Width], Field(min_length=1, max_length=6)]


class AirbenchFamily(ModelFamily):
    """airbench94's widths, and airbench95's (2.5x the compute per image) as `airbench-wide`."""

    WIDTHS = {"airbench": (64, 256, 256), "airbench-wide": (128, 384, 384)}
    names = tuple(WIDTHS)
    description = "the fast recipe's network for small images, trained from scratch"
    arch_kwargs = AirbenchKwargs

    def canonical(self, name: str) -> str:
        return name.lower()

    def architecture(self, name, num_classes, in_channels, image_size, model_cfg=None) -> dict:
        return {"name": name, "kwargs": {"num_classes": num_classes, "in_channels": in_channels,
                                         "widths": list(self.WIDTHS[name])}}

    def build(self, arch: dict) -> nn.Module:
        return AirbenchNet(**arch["kwargs"])

    def gradcam_layer(self, model: nn.Module) -> nn.Module:
        return model.groups[-1]

    def default_recipe(self, name: str, model_cfg=None) -> str:
        return "fast"


FAMILY = AirbenchFamily()
