"""Any timm architecture, trained from scratch (random weights, preprocessing from the data)."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .registry import ArchKwargs, Dropout, ModelFamily


def check_timm_name(name: str) -> None:
    import timm
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.replace('-', '_')}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `timm.list_models()`, or use classic-cnn)"
        raise UserError(f"unknown model {name!r}{hint}")


class TimmKwargs(ArchKwargs):
    # not the rest of timm's create_model arguments: `checkpoint_path` and `pretrained_cfg_overlay`
    # make it open files, and no pixclass run writes any other
    drop_rate: Dropout = 0.0


class TimmFamily(ModelFamily):
    description = "a timm architecture, trained from scratch"
    arch_kwargs = TimmKwargs

    def handles(self, name: str, model_cfg=None) -> bool:
        return True  # the last family asked: the name is checked against timm's list when built

    def handles_arch(self, arch: dict) -> bool:
        return True

    def architecture(self, name, num_classes, in_channels, image_size, model_cfg=None) -> dict:
        check_timm_name(name)
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if getattr(model_cfg, "dropout", None):
            kwargs["drop_rate"] = model_cfg.dropout
        return {"name": name, "kwargs": kwargs}

    def build(self, arch: dict) -> nn.Module:
        import timm
        check_timm_name(arch["name"])
        kwargs = dict(arch["kwargs"])
        in_chans = kwargs.pop("in_channels", 3)
        return timm.create_model(arch["name"], pretrained=False, in_chans=in_chans, **kwargs)

    def gradcam_layer(self, model: nn.Module) -> nn.Module:
        from .transfer import backbone_units
        units = backbone_units(model)
        return units[-1] if units else super().gradcam_layer(model)


FAMILY = TimmFamily()
