"""Common image corruptions at graded severities (after ImageNet-C, Hendrycks & Dietterich 2019),
applied to uint8 image batches N x C x H x W as the model would get them: the result is uint8
again, as a corrupted photo on disk would be. torchvision's functional transforms do the work.

Every corruption has three severities (1 light, 2 medium, 3 strong). Sizes that depend on the
image (the blur's sigma) are fractions of its side, so a severity means the same visible damage
at 32 and at 224 pixels. JPEG goes through Pillow (torchvision's own codec is deprecated)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

SEVERITIES = (1, 2, 3)

# the parameter of each severity, with what it means (shown in the report)
PARAMETERS = {
    "gaussian_noise": ((0.04, 0.08, 0.16), "noise std (pixels in [0, 1])"),
    "blur": ((1 / 96, 1 / 48, 1 / 32), "Gaussian blur sigma (fraction of the image side)"),
    "jpeg": ((50, 20, 8), "JPEG quality"),
    "brightness": ((1.5, 2.0, 3.0), "brightness factor"),
    "contrast": ((0.5, 0.3, 0.15), "contrast factor"),
    "rotation": ((10, 20, 40), "rotation (degrees, corners black)"),
}
CORRUPTIONS = tuple(PARAMETERS)


def _gaussian_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    x = images.float() / 255
    noise = torch.randn(x.shape, generator=generator)  # seeded: the same noise on every run
    return ((x + std * noise).clamp_(0, 1) * 255).round_().to(torch.uint8)


def _blur(images: torch.Tensor, fraction: float) -> torch.Tensor:
    sigma = fraction * images.shape[-1]
    kernel = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        array = image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer)).reshape(array.shape)
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1))
    return torch.stack(out)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 N x C x H x W -> the same images with corruption `name` at `severity` (1-3)."""
    value = PARAMETERS[name][0][severity - 1]
    if name == "gaussian_noise":
        return _gaussian_noise(images, value, torch.Generator().manual_seed(seed * 31 + severity))
    if name == "blur":
        return _blur(images, value)
    if name == "jpeg":
        return _jpeg(images, value)
    if name == "brightness":
        return F.adjust_brightness(images, value)
    if name == "contrast":
        return F.adjust_contrast(images, value)
    if name == "rotation":
        return F.rotate(images, value, interpolation=F.InterpolationMode.BILINEAR, fill=0)
    raise ValueError(f"unknown corruption {name!r} (one of {', '.join(CORRUPTIONS)})")

