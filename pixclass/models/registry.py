"""The model-family registry: one entry per kind of network, each in a file of its own.

A family says everything callers need to know about its networks: the names it answers to, the
`arch` description stored in the artifact and how to rebuild the network from it, whether and how
pretrained weights are loaded, the preprocessing those weights expect, the layer Grad-CAM looks at,
the part `--freeze` freezes and the recipe that trains it by default. Callers ask the family; none
asks "which class is this network?". A new family is a new file with a `FAMILY` object, named in
FAMILY_MODULES. Importing this module imports no family (the classic CNN never pays for timm)."""

from __future__ import annotations

import importlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserError

# searched in this order; the timm family comes last because it accepts any timm name
FAMILY_MODULES = ("classic_cnn", "airbench", "transfer", "timm_models")

# the bounds config.py puts on `data.image_size`: no run makes a network for other sizes
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MAX_CLASSES = 100_000
ImageSize = Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)]
Width = Annotated[int, Field(ge=1, le=8192)]  # channels or units of one layer
Dropout = Annotated[float, Field(ge=0, lt=1)]


class ArchKwargs(BaseModel):
    """The keyword arguments a family writes into `arch["kwargs"]`, with their types and ranges.

    A family's builder receives only the keys its subclass names: a pixclass.json is input from
    anywhere, and a builder passes its kwargs on (timm's `create_model` would open a file named by
    `checkpoint_path`, or by the `file` of a `pretrained_cfg_overlay`). Strict: no string or bool
    passes for a number. The ranges are sanity bounds; whether the sizes fit the weights is checked
    against the weights file before a real network is built."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    in_channels: Literal[1, 3] = 3


class ModelFamily:
    """The defaults suit a network trained from scratch whose preprocessing comes from the data."""

    names: tuple[str, ...] = ()  # the first is the canonical name, stored in new artifacts
    description = ""
    # True where pretrained weights fix the preprocessing: the network is then built before the
    # data is prepared, and `preprocess` gives the images' size and normalization
    weights_decide_preprocessing = False
    arch_kwargs: type[ArchKwargs] = ArchKwargs

    def input_size(self, kwargs: ArchKwargs) -> int | None:
        """The image size the network is built for where its arch records one, else None (the
        network pools globally and takes any size its strides allow)."""
        return None

    def handles(self, name: str, model_cfg=None) -> bool:
        return name.lower() in self.names

    def handles_arch(self, arch: dict) -> bool:
        return self.handles(arch["name"])

    def canonical(self, name: str) -> str:
        return self.names[0] if self.names and name.lower() in self.names else name

    def architecture(self, name: str, num_classes: int, in_channels: int, image_size: int, model_cfg=None) -> dict:
        raise NotImplementedError

    def build(self, arch: dict) -> nn.Module:
        """The network with random weights, from its `arch` description (no download, no training code)."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, arch: dict, model_cfg=None, reporter=None) -> None:
        """Pretrained or user-supplied weights; nothing for a network trained from scratch."""

    def preprocess(self, model: nn.Module, channels: int, size: int | None):
        """The Preprocess the network's weights expect, or None: chosen from the data."""
        return None

    def preprocess_before_build(self, name: str, channels: int, size: int | None):
        """`preprocess` when it is known from the name alone (so decoding can start before the
        network is built), else None."""
        return None

    def gradcam_layer(self, model: nn.Module) -> nn.Module:
        return last_conv(model)

    def frozen_part(self, model: nn.Module) -> nn.Module | None:
        """What a feature extractor keeps frozen (`--freeze`), or None when nothing is pretrained."""
        return None

    def default_recipe(self, name: str, model_cfg=None) -> str:
        return "scratch"


def last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("no convolutional layer found; pass --layer NAME")
    return convs[-1]


def families() -> list[ModelFamily]:
    return [importlib.import_module(f"{__package__}.{module}").FAMILY for module in FAMILY_MODULES]


def family_for(name: str, model_cfg=None) -> ModelFamily:
    """The family of a model name as a user gives it (with its config: pretrained or not)."""
    for family in families():
        if family.handles(name, model_cfg):
            return family
    raise UserError(f"unknown model {name!r}")  # not reached: the timm family takes any name and checks it


def family_of(arch: dict) -> ModelFamily:
    """The family of a stored `arch` description (an artifact's, or a checkpoint's)."""
    for family in families():
        if family.handles_arch(arch):
            return family
    raise UserError(f"no model family builds {arch.get('name')!r}")


def build_model(arch: dict) -> nn.Module:
    """Rebuild a network (random weights) from its `arch` description."""
    return family_of(arch).build(arch)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, model_cfg=None,
                 reporter=None):
    """(model, arch) for a dataset with `num_classes` classes, with pretrained or user-supplied
    weights loaded where the family and the config ask for them."""
    family = family_for(name, model_cfg)
    arch = family.architecture(family.canonical(name), num_classes, in_channels, image_size, model_cfg)
    model = family.build(arch)
    family.load_weights(model, arch, model_cfg, reporter)
    return model, arch
