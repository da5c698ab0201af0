"""The classic small CNN trained from scratch: Conv32-Pool-Conv64-Pool-Conv128-Pool-Flatten-
Dense256-Dense(classes), the network of the Keras image-classification tutorials.

User-facing name `classic-cnn`; `seed-cnn` (its earlier name) still works in configs and loads
older artifacts. Outputs logits: the softmax is applied by the loss (cross-entropy on logits is the
numerically stable form) and by the inference backends."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .registry import ArchKwargs, Dropout, ImageSize, ModelFamily, Width


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size if padding == "same" else size - kernel + 1


def min_image_size(n_blocks: int, kernel: int, padding: str) -> int:
    size = 1
    while True:
        s = size
        for _ in range(n_blocks):
            s = _conv_out(s, kernel, padding) // 2
        if s >= 1:
            return size
        size += 1


class ClassicCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 224,
                 filters=(32, 64, 128), kernel_size: int = 3, dense: int = 256,
                 padding: str = "valid", dropout: float = 0.0):
        super().__init__()
        layers, channels, size = [], in_channels, image_size
        for f in filters:
            layers += [nn.Conv2d(channels, f, kernel_size, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = f, _conv_out(size, kernel_size, padding) // 2
        if size < 1:
            need = min_image_size(len(filters), kernel_size, padding)
            raise ConfigError(f"image size {image_size} is too small for classic-cnn with {len(filters)} conv blocks "
                              f"(needs at least {need})")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, dense), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x C x H x W -> N x classes (logits)
        return self.classifier(self.features(x))


class ClassicCNNKwargs(ArchKwargs):
    # the defaults are ClassicCNN's, for an arch written without a model config
    image_size: ImageSize = 224
    filters: Annotated[list[Width], Field(min_length=1, max_length=8)] = [32, 64, 128]
    kernel_size: Literal[1, 3, 5, 7] = 3
    dense: Width = 256
    padding: Literal["valid", "same"] = "valid"
    dropout: Dropout = 0.0


class ClassicCNNFamily(ModelFamily):
    names = ("classic-cnn", "classic_cnn", "seed-cnn", "seed_cnn", "seedcnn")
    description = "the classic small CNN, trained from scratch"
    arch_kwargs = ClassicCNNKwargs

    def input_size(self, kwargs: ClassicCNNKwargs) -> int:
        return kwargs.image_size  # its Dense layer is sized for images of exactly this size

    def architecture(self, name, num_classes, in_channels, image_size, model_cfg=None) -> dict:
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if model_cfg is not None:
            kwargs.update(filters=list(model_cfg.filters), kernel_size=model_cfg.kernel_size, dense=model_cfg.dense,
                          padding=model_cfg.padding, dropout=model_cfg.dropout or 0.0)
        kwargs["image_size"] = image_size
        return {"name": self.names[0], "kwargs": kwargs}

    def build(self, arch: dict) -> nn.Module:
        return ClassicCNN(**arch["kwargs"])

    def gradcam_layer(self, model: nn.Module) -> nn.Module:
        return [m for m in model.features if isinstance(m, nn.ReLU)][-1]  # the last conv block, before pooling


FAMILY = ClassicCNNFamily()
