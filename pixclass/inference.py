"""Inference backends: the one place a model becomes probabilities.

A `Backend` holds a model with its class names and preprocessing and answers `probabilities(x)`
for a standardized float batch N x C x H x W, or `probabilities_uint8(batch)` for uint8 images
(preprocessed here, in the memory layout the backend runs fastest on). `scores(x)` and
`scores_uint8(batch)` also answer the feature similarity the knn_similarity abstain method reads
(feature_bank.py), or None where the model or the file has no feature bank. Three backends:
- `TorchBackend`: a PyTorch model (a saved artifact, or a model in memory);
- `OnnxBackend`: an exported .onnx file, run by ONNX Runtime;
- `LiteRTBackend`: an exported .tflite file, run by the LiteRT interpreter.
Validation during training, evaluation, prediction, the service, explanation and the export
checks all go through here, so they can never disagree on how logits become probabilities. The
artifact's test-time augmentation (tta.py) is part of that: `Probabilities` applies it, and it is
the network every export writes, so an exported file carries it in its graph.

The heavy runtimes (onnxruntime, ai_edge_litert) are imported by the constructors that need them:
importing this module costs only torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .abstain import Abstain
from .data.transforms import Preprocess, batch_to_input
from .errors import UserError, first_line
from .feature_bank import Scores
from .tta import activation
from .tta import probabilities as tta_probabilities


def softmax_probabilities(logits: torch.Tensor, multilabel: bool = False) -> np.ndarray:
    """Logits N x K -> float32 probabilities N x K. The softmax runs in float32 whatever the
    model's dtype, so a bf16 or fp16 model still gives probabilities that sum to 1; a multi-label
    model's are the sigmoid of each logit."""
    return activation(logits.detach().float(), multilabel).cpu().numpy()


class Probabilities(nn.Module):
    """model -> probabilities, with the artifact's test-time augmentation (`tta`): the network
    TorchBackend runs and every export writes, so an exported file answers as the PyTorch model
    does, augmentation included."""

    def __init__(self, model: nn.Module, tta: str = "none", temperature: float = 1.0, multilabel: bool = False):
        super().__init__()
        self.model, self.tta, self.temperature, self.multilabel = model, tta, temperature, multilabel

    @classmethod
    def of(cls, art, model: nn.Module | None = None) -> "Probabilities":
        """The artifact's network (or `model`, a wrapper of it) with the artifact's test-time
        augmentation and calibration temperature, in eval mode."""
        return cls((model if model is not None else art.model).eval(), art.tta, art.temperature,
                   art.multilabel).eval()

    def forward(self, x):  # N x C x H x W (standardized) -> N x classes (probabilities)
        return tta_probabilities(self.model, x, self.tta, self.temperature, self.multilabel)


def _as_float32_array(x) -> np.ndarray:
    """A numpy array or torch tensor -> C-contiguous float32 numpy (what the runtimes take)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class Backend:
    """A model with its classes and preprocessing that turns image batches into probabilities.
    A multi-label model's (`thresholds` given: one per class) answers every class whose
    probability reaches its threshold."""

    name = "backend"
    memory_format = torch.contiguous_format  # the layout `probabilities_uint8` standardizes into

    def __init__(self, classes: list[str], preprocess: Preprocess, abstain: Abstain | None = None,
                 thresholds: list[float] | None = None):
        self.classes, self.preprocess = list(classes), preprocess
        self.abstain = abstain  # when its answer is "unknown" (abstain.py); None: never
        self.thresholds = list(thresholds) if thresholds is not None else None

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def scores(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        """Standardized float N x C x H x W (numpy array or torch tensor) -> (float32 probabilities
        N x K, float32 feature similarities N or None)."""
        raise NotImplementedError

    def probabilities(self, x) -> np.ndarray:
        """Standardized float N x C x H x W (numpy array or torch tensor) -> float32 N x K."""
        return self.scores(x)[0]

    def scores_uint8(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 N x C x H x W (as data.transforms.image_to_uint8 makes them) -> as `scores`."""
        return self.scores(batch_to_input(batch, self.preprocess, memory_format=self.memory_format))

    def probabilities_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 N x C x H x W (as data.transforms.image_to_uint8 makes them) -> float32 N x K."""
        return self.scores_uint8(batch)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self.classes)} classes)"


class TorchBackend(Backend):
    """A PyTorch model on the CPU. The model is put in eval mode and its weights in channels_last
    memory order, in place: PyTorch's CPU convolutions are fastest with weights and inputs both in
    it (artifact.save writes contiguous copies, so saving afterwards is unaffected)."""

    name = "torch"
    memory_format = torch.channels_last

    def __init__(self, model: nn.Module, classes: list[str], preprocess: Preprocess, tta: str = "none",
                 temperature: float = 1.0, abstain: Abstain | None = None, thresholds: list[float] | None = None,
                 multilabel: bool | None = None, feature_bank: torch.Tensor | None = None):
        """`multilabel`: sigmoid outputs; by default, whether `thresholds` are given (a model in
        training has its sigmoid outputs before its thresholds are tuned)."""
        super().__init__(classes, preprocess, abstain, thresholds)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.network = network_of(self.model, tta, temperature, feature_bank,
                                  thresholds is not None if multilabel is None else multilabel)

    @classmethod
    def from_artifact(cls, art) -> "TorchBackend":
        return cls(art.model, art.classes, art.preprocess, art.tta, art.temperature, art.abstain, art.thresholds,
                   art.multilabel, art.feature_bank)

    def scores(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        with torch.inference_mode():
            out = self.network(x)
        if isinstance(out, tuple):
            return out[0].cpu().numpy(), out[1].cpu().numpy()
        return out.cpu().numpy(), None


def network_of(model: nn.Module, tta: str = "none", temperature: float = 1.0,
               feature_bank: torch.Tensor | None = None, multilabel: bool = False) -> nn.Module:
    """What a backend runs and an export writes: Probabilities, or with a feature bank Scores
    (probabilities and feature similarity), in eval mode."""
    if feature_bank is None:
        return Probabilities(model.eval(), tta, temperature, multilabel).eval()
    return Scores(model.eval(), feature_bank, tta, temperature, multilabel).eval()


class OnnxBackend(Backend):
    """An ONNX file exported by pixclass (its classes and preprocessing are in the file's
    metadata), run by ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, path, threads: int | None = None, spinning: bool = True):
        """`spinning=False`: the intra-op threads sleep as soon as a call ends instead of busy-waiting
        for the next one, leaving the cores to other threads of the process (a service's decoding)."""
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own exception types for a missing or broken file
            raise UserError(f"cannot load ONNX model {path}: {first_line(e)}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "pixclass_classes" not in meta:
            raise UserError(f"{path} was not exported by pixclass (no class names or preprocessing in its metadata)")
        super().__init__(json.loads(meta["pixclass_classes"]),
                         Preprocess.from_dict(json.loads(meta["pixclass_preprocess"])),
                         _abstain_of(meta.get("pixclass_abstain"), path),
                         _thresholds_of(meta.get("pixclass_thresholds"), path))
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, {self.input_name: _as_float32_array(x)})
        return out[0], (out[1] if len(out) > 1 else None)


def litert_sidecar(path) -> Path:
    """The JSON file beside a .tflite model with its class names and preprocessing (a .tflite file
    has no metadata of its own that Android's tooling would leave alone)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class LiteRTBackend(Backend):
    """A .tflite file exported by pixclass in the LiteRT interpreter: NHWC input, batch 1 (as on a
    phone), so a batch runs one image per invocation. Fully quantized models get their input
    quantized and their output dequantized here."""

    name = "litert"

    def __init__(self, path):
        super().__init__(*_read_sidecar(path))  # first: without it the file cannot be used at all
        from .extras import require
        interpreter_module = require("ai_edge_litert.interpreter", "tflite", "running a .tflite model")
        try:
            self.interpreter = interpreter_module.Interpreter(model_path=str(path), num_threads=1)
            self.interpreter.allocate_tensors()
        except Exception as e:  # the interpreter raises ValueError or RuntimeError depending on the failure
            raise UserError(f"cannot load TFLite model {path}: {first_line(e)}") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def scores(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        return np.concatenate([self._one(image[None]) for image in _as_float32_array(x)]), None

    def _one(self, x: np.ndarray) -> np.ndarray:
        x = x.transpose(0, 2, 3, 1)
        scale, zero = self.input["quantization"]
        if self.input["dtype"] != np.float32:  # a fully quantized model takes its input quantized
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(x, dtype=self.input["dtype"]))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale if self.output["dtype"] != np.float32 else y


def _abstain_of(text: str | None, path) -> Abstain | None:
    """An export's abstain threshold from its metadata (JSON text; absent or "null": none)."""
    try:
        return Abstain.from_dict(json.loads(text)) if text else None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: its abstain threshold is not one pixclass wrote ({first_line(e)})") from None


def _thresholds_of(text: str | None, path) -> list[float] | None:
    """A multi-label export's per-class thresholds from its metadata (JSON text; absent or "null":
    a single-label model)."""
    try:
        thresholds = json.loads(text) if text else None
        if thresholds is not None and not all(isinstance(t, (int, float)) for t in thresholds):
            raise ValueError("not a list of numbers")
        return thresholds
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: its label thresholds are not ones pixclass wrote ({first_line(e)})") from None


def _read_sidecar(path) -> tuple[list[str], Preprocess, Abstain | None, list[float] | None]:
    side = litert_sidecar(path)
    try:
        meta = json.loads(side.read_text())
        return meta["classes"], Preprocess.from_dict(meta["preprocess"]), \
            _abstain_of(json.dumps(meta.get("abstain")), side), _thresholds_of(json.dumps(meta.get("thresholds")), side)
    except FileNotFoundError:
        raise UserError(f"{path} has no {side.name} beside it (class names and preprocessing); "
                        "export it with pixclass export --format tflite") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{side} is not a pixclass TFLite description: {first_line(e)}") from None


MODEL_SUFFIXES = {".onnx": OnnxBackend, ".tflite": LiteRTBackend}


def open_backend(path) -> Backend:
    """A saved model folder -> TorchBackend, an .onnx file -> OnnxBackend, a .tflite file ->
    LiteRTBackend."""
    path = Path(path).expanduser()
    if path.suffix in MODEL_SUFFIXES:
        return MODEL_SUFFIXES[path.suffix](path)
    if path.is_file():
        raise UserError(f"cannot run {path}: expected a saved model folder, an .onnx or a .tflite file")
    from . import artifact as artifact_io
    return TorchBackend.from_artifact(artifact_io.load(path))  # its own one-line error for a bad folder


def predict_batches(backend: Backend, batches):
    """batches yields (uint8 images, labels, indices). Returns (probs N x K, labels N (multi-label:
    N x K), indices N)."""
    probs, _, labels, indices = score_batches(backend, batches)
    return probs, labels, indices


def score_batches(backend: Backend, batches):
    """As predict_batches, with the feature similarities N (None: the backend has none) after the
    probabilities."""
    probs, sims, labels, indices = [], [], [], []
    for images, y, idx in batches:
        p, s = backend.scores_uint8(images)
        probs.append(p)
        sims.append(s)
        labels.append(y)
        indices.append(idx)
    if not probs:
        return np.zeros((0, 0), np.float32), None, np.zeros(0, np.int64), np.zeros(0, np.int64)
    similarity = np.concatenate(sims) if all(s is not None for s in sims) else None
    return np.concatenate(probs), similarity, torch.cat(labels).numpy(), torch.cat(indices).numpy()
