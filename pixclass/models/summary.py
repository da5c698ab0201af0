"""A Keras-like model summary (layers, output shapes, parameter counts) via torchinfo."""

from __future__ import annotations

from torch import nn


def model_summary(model: nn.Module, channels: int, image_size: int, depth: int = 3) -> str:
    from torchinfo import summary
    stats = summary(model, input_size=(1, channels, image_size, image_size), depth=depth, verbose=0,
                    col_names=("output_size", "num_params", "trainable"), row_settings=("var_names",))
    return str(stats)
