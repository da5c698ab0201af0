"""The model artifact: a folder with `model.safetensors` (weights) and `pixclass.json`
(architecture and its arguments, class names, preprocessing, test-time augmentation, calibration
temperature, abstain threshold, task (single-label "multiclass", or "multilabel" with one threshold
per class), training config, metrics, versions). The abstain method knn_similarity's bank of
training features (feature_bank.py) is one more tensor in the safetensors file, under a name no
network parameter has.

Loading checks the JSON against its schema (artifact_schema.py) and the weights' shapes against
the network it describes, then rebuilds the network and fills it from safetensors: no pickle
anywhere, and nothing from the training code is imported."""

from __future__ import annotations

import json
import platform
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_weights
from torch import nn

from .atomic_write import replace_atomically, write_text_atomically
from .abstain import Abstain
from .artifact_schema import FORMAT, Metadata, read_metadata
from .data.transforms import Preprocess
from .errors import UserError, first_line
from .feature_bank import BANK_KEY, classifier_layer, tapped
from .tta import TTA_MODES

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
    tta: str = "none"  # the test-time augmentation every backend and export applies (tta.py)
    temperature: float = 1.0  # divides the logits before the softmax, everywhere (calibration.py)
    abstain: Abstain | None = None  # when the model answers "unknown" (abstain.py); None: never
    # a multi-label model's (sigmoid outputs) per-class decision thresholds, tuned on validation;
    # None: a single-label model (softmax, one class per image)
    thresholds: list[float] | None = None
    feature_bank: torch.Tensor | None = None  # M x D float16, normalized training features (feature_bank.py)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    def __post_init__(self):
        if self.tta not in TTA_MODES:  # a recipe's mistake: caught here, not in a file no loader accepts
            raise ValueError(f"unknown test-time augmentation {self.tta!r} (one of {', '.join(TTA_MODES)})")

    def metadata(self) -> dict:
        return {"format": FORMAT, "arch": self.arch, "classes": list(self.classes),
                "preprocess": self.preprocess.to_dict(), "tta": self.tta, "temperature": self.temperature,
                "abstain": self.abstain.to_dict() if self.abstain else None, "task": self.task,
                "thresholds": self.thresholds, "config": self.config,
                "metrics": self.metrics, "versions": self.versions or library_versions()}


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


def save(artifact: Artifact, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in artifact.model.state_dict().items()}
    if artifact.feature_bank is not None:
        state[BANK_KEY] = artifact.feature_bank.detach().cpu().half().contiguous()
    # each file replaced whole: a full disk leaves one line and no temporary file filling it
    replace_atomically(folder / WEIGHTS_FILE, lambda f: f.write(save_weights(state, metadata={"format": FORMAT})))
    write_text_atomically(folder / META_FILE, json.dumps(artifact.metadata(), indent=2))
    return folder


def files_digest(folder) -> str:
    """SHA-256 of the model folder's two files: which model answered, whatever the folder is called."""
    import hashlib
    h = hashlib.sha256()
    for name in (META_FILE, WEIGHTS_FILE):
        data = (Path(folder) / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def load(folder) -> Artifact:
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if folder.is_file() and folder.name == META_FILE:
        return load(folder.parent)
    if not meta_path.is_file() or not weights_path.is_file():
        raise UserError(f"not a pixclass model folder (needs {META_FILE} and {WEIGHTS_FILE}): {folder}")
    meta = read_metadata(meta_path)
    # the network's shapes against the weights' before a real tensor exists: the JSON's numbers
    # (layer widths, image size, class count) cannot make the loader allocate more than the
    # weights file holds
    try:
        shapes_only = _build(meta, meta_path, device="meta")
    except UserError:
        raise
    except Exception as e:  # a combination the ranges allow but the network does not
        raise UserError(f"{meta_path}: arch: cannot build this network ({type(e).__name__}: {first_line(e)})") from None
    _check_weights_fit(shapes_only, weights_path)
    model = _build(meta, meta_path, device="cpu")  # now no bigger than the weights file
    try:
        state = load_file(str(weights_path))
    except Exception as e:
        raise UserError(f"{weights_path} is not a valid safetensors file ({first_line(e)})") from None
    bank = state.pop(BANK_KEY, None)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights_path} does not fit the architecture in {META_FILE}: "
                        f"{first_line(e)}") from None
    model.eval()
    preprocess = Preprocess.from_dict(meta.spec.preprocess.model_dump())
    features = _check_answers_one_score_per_class(model, preprocess, len(meta.spec.classes), meta_path)
    abstain = Abstain.from_dict(meta.spec.abstain.model_dump(exclude_none=True) if meta.spec.abstain else None)
    _check_bank(bank, features, abstain, weights_path)
    return Artifact(model=model, arch=meta.arch, classes=list(meta.spec.classes), preprocess=preprocess,
                    config=meta.spec.config, metrics=meta.spec.metrics, versions=meta.spec.versions,
                    tta=meta.spec.tta, temperature=meta.spec.temperature,
                    thresholds=list(meta.spec.thresholds) if meta.spec.task == "multilabel" else None,
                    abstain=abstain, feature_bank=bank)


def _check_bank(bank: torch.Tensor | None, features: int | None, abstain: Abstain | None, weights_path: Path) -> None:
    """A knn_similarity threshold needs the bank, and the bank the network's feature width."""
    if abstain is not None and abstain.method == "knn_similarity" and bank is None:
        raise UserError(f"{weights_path}: the abstain method knn_similarity needs the feature bank {BANK_KEY}, "
                        "which this file lacks")
    if bank is not None and (bank.ndim != 2 or bank.shape[1] != features or not bank.dtype.is_floating_point):
        raise UserError(f"{weights_path}: {BANK_KEY} has shape {list(bank.shape)}, the network's features are "
                        f"{features} wide")


def _build(meta: Metadata, meta_path: Path, device: str) -> nn.Module:
    try:
        with torch.device(device):
            return meta.family.build(meta.arch)
    except UserError as e:  # e.g. an unknown timm name
        raise UserError(f"{meta_path}: arch: {e}") from None


def _check_weights_fit(model: nn.Module, weights_path: Path) -> None:
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:
        raise UserError(f"{weights_path} is not a valid safetensors file ({first_line(e)})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problem = next((f"{name} is missing" for name in expected if name not in stored), None)
    problem = problem or next((f"{name} is not part of the network" for name in stored
                               if name not in expected and name != BANK_KEY), None)
    problem = problem or next((f"{name} has shape {list(stored[name])}, the network's is {list(shape)}"
                               for name, shape in expected.items() if stored[name] != shape), None)
    if problem:
        raise UserError(f"{weights_path} does not fit the architecture in {META_FILE}: {problem}")


def _check_answers_one_score_per_class(model: nn.Module, preprocess: Preprocess, n_classes: int,
                                       meta_path: Path) -> int | None:
    """One image of the stored size through the network: sizes the network cannot take (a
    timm network with a fixed position embedding, strides that leave nothing) fail here, with one
    line, rather than at the first prediction; and the class list must name every output.
    Returns the width of the network's penultimate features (None: no classifier layer found)."""
    size = preprocess.size
    try:
        with torch.inference_mode(), _tapped_if_possible(model) as captured:
            out = model(torch.zeros(1, preprocess.channels, size, size))
    except Exception as e:
        raise UserError(f"{meta_path}: preprocess.size: the network cannot take {size}x{size} images "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if out.ndim != 2 or out.shape[1] != n_classes:
        raise UserError(f"{meta_path}: classes: {n_classes} names, but the network answers {list(out.shape[1:])} "
                        f"scores per image")
    return captured[0].flatten(1).shape[1] if captured[0] is not None else None


def _tapped_if_possible(model: nn.Module):
    """feature_bank.tapped(model), or a capture that stays None for a network without a classifier layer."""
    try:
        classifier_layer(model)
    except ValueError:  # no classifier layer: no bank can fit
        return nullcontext([None])
    return tapped(model)
