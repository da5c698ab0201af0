"""The model artifact: a folder with `model.safetensors` (weights) and `pixclass.json`
(architecture and its arguments, class names, preprocessing, training config, metrics, versions).

Loading rebuilds the network from the JSON and fills it from safetensors: no pickle anywhere, and
nothing from the training code is imported."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data.transforms import Preprocess
from .errors import UserError, first_line
from .models.registry import build_model

FORMAT = "pixclass-artifact/1"
WEIGHTS_FILE, META_FILE = "model.safetensors", "pixclass.json"


@dataclass
class Artifact:
    model: nn.Module
    arch: dict
    classes: list[str]
    preprocess: Preprocess
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {"format": FORMAT, "arch": self.arch, "classes": list(self.classes),
                "preprocess": self.preprocess.to_dict(), "config": self.config, "metrics": self.metrics,
                "versions": self.versions or library_versions()}


def library_versions() -> dict:
    # from the installed metadata: importing timm (and with it torchvision) just to read a
    # version would add seconds to a classic-CNN run
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"pixclass": __version__, "torch": torch.__version__, "torchvision": installed("torchvision"),
            "timm": installed("timm"), "python": platform.python_version()}


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(artifact: Artifact, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in artifact.model.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, folder / WEIGHTS_FILE)
    _atomic_write_text(folder / META_FILE, json.dumps(artifact.metadata(), indent=2))
    return folder


def load(folder) -> Artifact:
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if folder.is_file() and folder.name == META_FILE:
        return load(folder.parent)
    if not meta_path.is_file() or not weights_path.is_file():
        raise UserError(f"not a pixclass model folder (needs {META_FILE} and {WEIGHTS_FILE}): {folder}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: unsupported artifact format {meta.get('format')!r}")
    try:
        model = build_model(meta["arch"])
        preprocess = Preprocess.from_dict(meta["preprocess"])
        classes = list(meta["classes"])
    except UserError:
        raise
    except Exception as e:  # a hand-edited or foreign JSON: name what is wrong, no traceback
        raise UserError(f"{meta_path}: incomplete or invalid model description "
                        f"({type(e).__name__}: {first_line(e)})") from None
    try:
        state = load_file(str(weights_path))
    except Exception as e:
        raise UserError(f"{weights_path} is not a valid safetensors file ({first_line(e)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights_path} does not fit the architecture in {META_FILE}: "
                        f"{first_line(e)}") from None
    model.eval()
    return Artifact(model=model, arch=meta["arch"], classes=classes, preprocess=preprocess,
                    config=meta.get("config", {}), metrics=meta.get("metrics", {}), versions=meta.get("versions", {}))
