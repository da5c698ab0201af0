"""create_model: one entry point for the seed CNN and every timm architecture.

An architecture is described by `arch = {"name": ..., "kwargs": {...}}`; that dict is stored in
the artifact, and `build_model(arch)` rebuilds the same network without any training code."""

from __future__ import annotations

from torch import nn

from ..errors import UserError

SEED_NAMES = ("seed-cnn", "seed_cnn", "seedcnn")


def canonical_name(name: str) -> str:
    return "seed-cnn" if name.lower() in SEED_NAMES else name


def architecture(name: str, num_classes: int, in_channels: int, image_size: int, model_cfg=None) -> dict:
    """The arguments needed to build `name` for this data; checks the name exists."""
    name = canonical_name(name)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if name == "seed-cnn":
        if model_cfg is not None:
            kwargs.update(filters=list(model_cfg.filters), kernel_size=model_cfg.kernel_size, dense=model_cfg.dense,
                          padding=model_cfg.padding, dropout=model_cfg.dropout)
        kwargs["image_size"] = image_size
    else:
        check_timm_name(name)
        if model_cfg is not None and model_cfg.dropout:
            kwargs["drop_rate"] = model_cfg.dropout
    return {"name": name, "kwargs": kwargs}


def check_timm_name(name: str) -> None:
    import timm
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.replace('-', '_')}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `timm.list_models()`, or use seed-cnn)"
        raise UserError(f"unknown model {name!r}{hint}")


def build_model(arch: dict) -> nn.Module:
    """Rebuild a network (random weights) from its `arch` description."""
    name, kwargs = arch["name"], dict(arch["kwargs"])
    if name == "seed-cnn":
        from .seed_cnn import SeedCNN
        return SeedCNN(**kwargs)
    import timm
    check_timm_name(name)
    in_chans = kwargs.pop("in_channels", 3)
    return timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, model_cfg=None):
    """(model, arch) for a dataset with `num_classes` classes."""
    arch = architecture(name, num_classes, in_channels, image_size, model_cfg)
    return build_model(arch), arch
