"""A pretrained timm backbone with a small classification head: GlobalAveragePooling -> Dense 256
ReLU -> Dropout -> Dense classes (the Keras transfer-learning tutorials' head), or (head
"normalized", the few-shot recipe's) one Dense layer on the L2-normalized pooled vector, whose rows
are scaled class prototypes or a linear classifier's weights.

The backbone is also seen as a chain of units (stem, stages, final conv...) whose sequential
application equals `forward_features`. That lets training freeze the first units, compute their
output once per image and cache it, and train only the units after the cut plus the head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import pretrained as pretrained_weights
from .registry import ArchKwargs, Dropout, ModelFamily, Width

# containers whose children are the stages to split at (timm's EfficientNet/MobileNet `blocks`,
# ConvNeXt/RegNet `stages`, ...); everything else at the top level is one unit
_STAGE_CONTAINERS = ("blocks", "stages", "layers", "features")
_NOT_FEATURES = ("global_pool", "head", "fc", "classifier", "head_drop", "fc_norm", "head_hidden_size", "pre_logits",
                 "flatten")


class TransferModel(nn.Module):
    def __init__(self, timm_name: str, num_classes: int, in_channels: int = 3, hidden: int = 256, dropout: float = 0.2,
                 head: str = "mlp"):
        super().__init__()
        import timm
        self.backbone_name = timm_name
        self.backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_channels)
        self.head = (NormalizedLinear(self.backbone.num_features, num_classes) if head == "normalized"
                     else classification_head(self.backbone.num_features, num_classes, hidden, dropout))
        # a plain tuple, not a ModuleList: the units are the backbone's own modules, and
        # registering them twice would duplicate every tensor in the state dict
        self.units = backbone_units(self.backbone)

    @property
    def n_units(self) -> int:
        """Places the backbone can be cut: its units, or 1 (all or nothing) if it has none."""
        return len(self.units) if self.units is not None else 1

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone feature map -> pooled vector (N x num_features)."""
        return self.backbone.forward_head(features, pre_logits=True)

    def forward_from(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """Logits from the output of unit `start - 1` (start=0: from the image)."""
        if self.units is None:
            return self.head(self.backbone(x) if start == 0 else self.pooled(x))
        for unit in self.units[start:]:
            x = unit(x)
        return self.head(self.pooled(x))

    def features_until(self, stop: int, x: torch.Tensor) -> torch.Tensor:
        """Output of units [0, stop) for an image batch."""
        if self.units is None:
            return x if stop == 0 else self.backbone.forward_features(x)
        for unit in self.units[:stop]:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x C x H x W -> N x classes (logits)
        return self.head(self.backbone(x))


def classification_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


class NormalizedLinear(nn.Linear):
    """A Dense layer on the L2-normalized input: with unit-norm rows times a scale, the logits are
    scaled cosine similarities to class prototypes (nearest class mean); any rows and bias make it
    a linear classifier on normalized embeddings. A plain module, so every export takes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.normalize(x, dim=-1))


def backbone_units(backbone: nn.Module) -> tuple[nn.Module, ...] | None:
    """The backbone's feature extractor as a list of units, or None when running its top-level
    children in order does not reproduce `forward_features` (then it is all or nothing)."""
    units = []
    for name, child in backbone.named_children():
        if name in _NOT_FEATURES:
            continue
        if name in _STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            units += list(child)
        else:
            units.append(child)
    units = tuple(units)
    if any(p.is_meta for p in backbone.parameters()):
        return None  # a shape-only build (the artifact loader's check): no values to compare
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            x = torch.randn(1, _in_chans(backbone), 64, 64)
            y = x
            for unit in units:
                y = unit(y)
            ok = y.shape == backbone.forward_features(x).shape and torch.allclose(y, backbone.forward_features(x), atol=1e-5)
    except Exception:
        ok = False
    backbone.train(was_training)
    return units if ok else None


def _in_chans(backbone: nn.Module) -> int:
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def default_cut(model: TransferModel) -> int:
    """Where fine-tuning starts by default: the last two units of the backbone (for
    EfficientNet-Lite, the 1x1 head convolution and its BatchNorm). Cheap on a CPU, since the
    frozen part before it is cached, and enough to adapt the features to the new classes."""
    if model.units is None:
        return 0
    cut = max(0, len(model.units) - 2)
    while cut > 0 and not any(p.numel() for u in model.units[cut:] for p in u.parameters()):
        cut -= 1
    return cut


TRANSFER_DROPOUT = 0.2


def uses_pretrained(name: str, model_cfg=None) -> bool:
    """Pretrained unless switched off; by default only where weights ship offline (or a file is given)."""
    explicit = getattr(model_cfg, "pretrained", None)
    if explicit is not None:
        return explicit
    return pretrained_weights.has_offline_weights(name) or bool(getattr(model_cfg, "weights", None))


class TransferKwargs(ArchKwargs):
    hidden: Width = 256
    dropout: Dropout = TRANSFER_DROPOUT
    head: Literal["mlp", "normalized"] = "mlp"


class PretrainedBackboneFamily(ModelFamily):
    """Any timm backbone with ImageNet weights (offline for EfficientNet-Lite0/1/2, from timm's
    cache otherwise) or a user's weights file, under the classification head."""

    description = "a pretrained timm backbone with a new head, fine-tuned"
    weights_decide_preprocessing = True
    arch_kwargs = TransferKwargs

    def handles(self, name: str, model_cfg=None) -> bool:
        return uses_pretrained(name, model_cfg)

    def handles_arch(self, arch: dict) -> bool:
        return "backbone" in arch

    def architecture(self, name, num_classes, in_channels, image_size, model_cfg=None) -> dict:
        from .timm_models import check_timm_name
        backbone = pretrained_weights.timm_name(name)
        check_timm_name(backbone)
        dropout = getattr(model_cfg, "dropout", None)
        kwargs = {"num_classes": num_classes, "in_channels": in_channels, "hidden": getattr(model_cfg, "hidden", 256),
                  "dropout": TRANSFER_DROPOUT if dropout is None else dropout}
        return {"name": name, "backbone": backbone, "kwargs": kwargs}

    def build(self, arch: dict) -> nn.Module:
        from .timm_models import check_timm_name
        check_timm_name(arch["backbone"])
        return TransferModel(arch["backbone"], **arch["kwargs"])

    def load_weights(self, model, arch, model_cfg=None, reporter=None) -> None:
        weights_file = getattr(model_cfg, "weights", None)
        if not weights_file:
            pretrained_weights.load_backbone(model.backbone, arch["name"], arch["kwargs"].get("in_channels", 3))
            return
        report = pretrained_weights.load_matching(model, pretrained_weights.read_state_dict(weights_file))
        if reporter is not None:
            reporter.info(f"weights from {weights_file}: {len(report['matched'])} tensors matched, "
                          f"{len(report['missing'])} left as initialized, {len(report['unused'])} unused, "
                          f"{len(report['shape_mismatch'])} with another shape")

    def preprocess(self, model, channels, size):
        return pretrained_weights.pretrained_preprocess(model.backbone, channels, size)

    def preprocess_before_build(self, name, channels, size):
        return pretrained_weights.known_preprocess(name, channels, size)

    def gradcam_layer(self, model):
        return model.units[-1] if model.units is not None else super().gradcam_layer(model.backbone)

    def frozen_part(self, model):
        return model.backbone

    def default_recipe(self, name, model_cfg=None) -> str:
        return "transfer"


FAMILY = PretrainedBackboneFamily()
