"""The only place pixels become tensors.

`Preprocess` travels inside the artifact, so training, evaluation, prediction and serving turn an
image into a tensor the same way. Two stages:
1. `image_to_uint8` (per image): resize a decoded PIL image to the model's size -> uint8 CxHxW.
   Cheap to store, so datasets that fit in memory are decoded and resized once.
2. `batch_to_input` (per batch): optional batched augmentation, then scaling and mean/std
   standardization -> float NCHW in channels_last memory order."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import AugmentConfig
from ..errors import ConfigError

_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
_GRID_PADDING = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}


@dataclass(frozen=True)
class Preprocess:
    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    resize: str = "squash"  # "squash": straight to size x size (Keras target_size); "crop": short side, then centre crop
    crop_pct: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ConfigError(f"interpolation must be one of {', '.join(_PIL_INTERPOLATION)}")
        if self.resize not in ("squash", "crop"):
            raise ConfigError("resize must be 'squash' or 'crop'")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"mean/std need {self.channels} values")
        if min(self.std) <= 0:
            raise ConfigError("std values must be > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**d)


def image_to_uint8(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Decoded RGB/L image -> uint8 tensor C x size x size."""
    interp = _PIL_INTERPOLATION[pre.interpolation]
    if pre.resize == "squash":
        img = img.resize((pre.size, pre.size), interp)
    else:
        # resize the short side to size / crop_pct and keep the centre size x size, computed as one
        # resample of the source region that lands in the crop (PIL's `box`): the same pixels as
        # resize-then-crop, without resampling the parts that are cut away
        scaled = int(math.floor(pre.size / pre.crop_pct))
        w, h = img.size
        ratio = scaled / min(w, h)
        out_w, out_h = max(scaled, round(w * ratio)), max(scaled, round(h * ratio))
        left, top = (out_w - pre.size) // 2, (out_h - pre.size) // 2
        sx, sy = w / out_w, h / out_h
        box = (left * sx, top * sy, (left + pre.size) * sx, (top + pre.size) * sy)
        img = img.resize((pre.size, pre.size), interp, box=box)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """float in [0, 1] NCHW -> standardized."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def batch_to_input(batch: torch.Tensor, pre: Preprocess, augment: "BatchAugment | None" = None,
                   generator: torch.Generator | None = None,
                   memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """uint8 N x C x H x W -> standardized float input, augmented when `augment` is given.
    channels_last by default: PyTorch's CPU convolutions are fastest in it."""
    x = batch.float().div_(255.0)
    if augment is not None:
        x = augment(x, generator)
    return normalize(x, pre).contiguous(memory_format=memory_format)


def _uniform(n: int, low: float, high: float, g) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


class BatchAugment:
    """Keras-style augmentation (AugmentConfig) applied to a whole batch at once: one affine grid per image
    (rotation, shift, shear, zoom, flips) sampled in a single `grid_sample`, then brightness and
    contrast jitter. Works on float images in [0, 1]."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def affine_matrices(self, n: int, g) -> torch.Tensor:
        """N x 2 x 3 matrices mapping output to input coordinates (normalized to [-1, 1])."""
        c = self.cfg
        angle = _uniform(n, -c.rotation, c.rotation, g) * math.pi / 180
        shear = _uniform(n, -c.shear, c.shear, g)
        zx = _uniform(n, 1 - c.zoom, 1 + c.zoom, g)
        zy = _uniform(n, 1 - c.zoom, 1 + c.zoom, g)
        tx = _uniform(n, -c.width_shift, c.width_shift, g) * 2  # fraction of width -> normalized units
        ty = _uniform(n, -c.height_shift, c.height_shift, g) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear_m = torch.zeros(n, 2, 2)
        shear_m[:, 0, 0], shear_m[:, 0, 1], shear_m[:, 1, 1] = 1, shear, 1
        zoom_m = torch.diag_embed(torch.stack([zx, zy], -1))
        a = rot @ shear_m @ zoom_m
        if c.horizontal_flip:
            flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            a[:, :, 0] *= flip[:, None]
        if c.vertical_flip:
            flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            a[:, :, 1] *= flip[:, None]
        return torch.cat([a, torch.stack([tx, ty], -1)[:, :, None]], dim=2)

    def _draw(self, n: int, g) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        return (self.affine_matrices(n, g), _uniform(n, 1 - c.brightness, 1 + c.brightness, g),
                _uniform(n, 1 - c.contrast, 1 + c.contrast, g))

    def __call__(self, x: torch.Tensor, g=None) -> torch.Tensor:
        """`g`: one generator for the batch, or a list with one per image (then an image's
        augmentation does not depend on which batch it is in)."""
        n = x.shape[0]
        if isinstance(g, (list, tuple)):
            draws = [self._draw(1, gi) for gi in g]
            theta, bright, contrast = (torch.cat(parts) for parts in zip(*draws))
        else:
            theta, bright, contrast = self._draw(n, g)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=_GRID_PADDING[self.cfg.fill], align_corners=False)
        if self.cfg.brightness > 0:
            x = x * bright.view(n, 1, 1, 1)
        if self.cfg.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast.view(n, 1, 1, 1) + mean
        return x.clamp_(0, 1)


def build_augment(cfg: AugmentConfig) -> BatchAugment | None:
    return BatchAugment(cfg) if cfg.enabled else None
