"""create_model: one entry point for the seed CNN, any timm architecture, and pretrained
backbones with the guide's transfer head.

An architecture is described by `arch = {"name": ..., "kwargs": {...}}` (plus "backbone" for a
transfer model); that dict is stored in the artifact, and `build_model(arch)` rebuilds the same
network without any training code and without downloading anything."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from . import pretrained as pretrained_weights

SEED_NAMES = ("seed-cnn", "seed_cnn", "seedcnn")
FAST_NAME = "airbench"  # the network of the fast from-scratch recipe
# its sizes: airbench94's widths, and airbench95's (2.5x the compute per image)
FAST_WIDE_NAME = "airbench-wide"
FAST_WIDTHS = {FAST_NAME: (64, 256, 256), FAST_WIDE_NAME: (128, 384, 384)}
TRANSFER_DROPOUT = 0.2


def canonical_name(name: str) -> str:
    return "seed-cnn" if name.lower() in SEED_NAMES else name


def uses_pretrained(name: str, model_cfg=None) -> bool:
    """Pretrained unless switched off; by default only where offline weights ship."""
    name = canonical_name(name)
    if name == "seed-cnn" or name in FAST_WIDTHS:
        return False
    explicit = getattr(model_cfg, "pretrained", None)
    if explicit is not None:
        return explicit
    return pretrained_weights.has_offline_weights(name) or bool(getattr(model_cfg, "weights", None))


def architecture(name: str, num_classes: int, in_channels: int, image_size: int, model_cfg=None) -> dict:
    """The arguments needed to build `name` for this data; checks the name exists."""
    name = canonical_name(name)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    dropout = getattr(model_cfg, "dropout", None)
    if name == "seed-cnn":
        if model_cfg is not None:
            kwargs.update(filters=list(model_cfg.filters), kernel_size=model_cfg.kernel_size, dense=model_cfg.dense,
                          padding=model_cfg.padding, dropout=dropout or 0.0)
        kwargs["image_size"] = image_size
        return {"name": name, "kwargs": kwargs}
    if name in FAST_WIDTHS:
        return {"name": name, "kwargs": dict(kwargs, widths=list(FAST_WIDTHS[name]))}
    backbone = pretrained_weights.timm_name(name)
    check_timm_name(backbone)
    if uses_pretrained(name, model_cfg):
        kwargs.update(hidden=getattr(model_cfg, "hidden", 256),
                      dropout=TRANSFER_DROPOUT if dropout is None else dropout)
        return {"name": name, "backbone": backbone, "kwargs": kwargs}
    if dropout:
        kwargs["drop_rate"] = dropout
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
    if name in FAST_WIDTHS:
        from .airbench import AirbenchNet
        return AirbenchNet(**kwargs)
    if "backbone" in arch:
        from .transfer import TransferModel
        return TransferModel(arch["backbone"], **kwargs)
    import timm
    check_timm_name(name)
    in_chans = kwargs.pop("in_channels", 3)
    return timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, model_cfg=None,
                 reporter=None):
    """(model, arch) for a dataset with `num_classes` classes, with pretrained or user-supplied
    weights loaded where asked for."""
    arch = architecture(name, num_classes, in_channels, image_size, model_cfg)
    model = build_model(arch)
    if "backbone" in arch:
        weights_file = getattr(model_cfg, "weights", None)
        if weights_file:
            report = pretrained_weights.load_matching(model, pretrained_weights.read_state_dict(weights_file))
            if reporter is not None:
                reporter.info(f"weights from {weights_file}: {len(report['matched'])} tensors matched, "
                              f"{len(report['missing'])} left as initialized, {len(report['unused'])} unused, "
                              f"{len(report['shape_mismatch'])} with another shape")
        else:
            pretrained_weights.load_backbone(model.backbone, arch["name"], in_channels)
    return model, arch
