"""Mobile formats: TensorFlow Lite (Android) through litert-torch, Core ML (iOS) through coremltools.
Both are optional extras (`pip install 'pixclass[tflite]'`, `'pixclass[coreml]'`); export.py
verifies what they write.

TFLite: NHWC float input (TFLite's and Android's layout), standardized as in training, batch 1,
probabilities out; `--int8` quantizes weights and activations (ai-edge-quantizer's static int8
recipe, calibrated on training images), input and output included. The class names and the
preprocessing go in a JSON file beside the model. It runs here in the LiteRT interpreter, so it is
scored like the ONNX export.

Core ML: an ML Program classifier whose input is the image itself (pixels 0-255, the
standardization is inside the model) and whose outputs are the class label and the probability of
every class. It cannot run outside macOS, so on Linux the check is of what the file declares."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError, first_line
from .extras import captured_output, require
from .fastest_backend import answer_metadata
from .inference import Probabilities, litert_sidecar


@contextmanager
def _quiet(what: str):
    """Run a conversion step silently; if it fails, one error with the end of what it printed."""
    import sys
    failure, tail = None, []
    with captured_output() as log:
        try:
            yield
        except Exception as e:
            failure = e
            sys.stdout.flush()
            sys.stderr.flush()
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
    if failure is not None:
        raise UserError("\n  ".join([f"{what} failed: {first_line(failure)}"] + tail)) from None


def export_tflite(art, path: Path, calibration: np.ndarray | None = None) -> Path:
    """fp32, or int8 when `calibration` (standardized NCHW inputs) is given."""
    litert_torch = require("litert_torch", "tflite")
    pre = art.preprocess
    model = litert_torch.to_channel_last_io(Probabilities.of(art), args=[0]).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pixclass-tflite-") as work:
        # the float model of an int8 export is an intermediate: kept out of the user's folder
        float_path = path if calibration is None else Path(work) / "model.fp32.tflite"
        with _quiet("TFLite conversion"):
            litert_torch.convert(model, (torch.zeros(1, pre.size, pre.size, pre.channels),)).export(str(float_path))
        if calibration is not None:
            with _quiet("TFLite int8 quantization"):
                _quantize_int8(float_path, path, calibration)
    # "tta" and "temperature" say what the graph already does (Probabilities): nothing reads them to
    # apply them again; "abstain" is applied to the graph's probabilities (the graph has no feature
    # similarity: a knn_similarity threshold's max_probability fallback)
    litert_sidecar(path).write_text(json.dumps({"classes": art.classes, "preprocess": art.preprocess.to_dict(),
                                                "tta": art.tta, "temperature": art.temperature,
                                                "abstain": json.loads(answer_metadata(art, similarity=False)["abstain"]),
                                                "task": art.task, "thresholds": art.thresholds,
                                                "input": "NHWC float32, standardized (int8 models: quantized with "
                                                         "the input's scale and zero point)"}, indent=1))
    return path


def _quantize_int8(float_path: Path, out: Path, calibration: np.ndarray) -> None:
    quantizer = require("ai_edge_quantizer.quantizer", "tflite")
    recipe = require("ai_edge_quantizer.recipe", "tflite")
    q = quantizer.Quantizer(str(float_path))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    nhwc = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1), dtype=np.float32)
    name = _signature_input(str(float_path))
    result = q.calibrate({"serving_default": [{name: nhwc[i:i + 1]} for i in range(len(nhwc))]}, num_threads=2)
    q.quantize(result).export_model(str(out), overwrite=True)


def _signature_input(path: str) -> str:
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=path).get_signature_list()["serving_default"]["inputs"][0]


class _StandardizePixels(nn.Module):
    """Pixels 0-255 in, standardized out: Core ML's image input carries one scale for all
    channels, so the per-channel standardization goes inside the model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, x):
        return (x - self.mean) / self.std


def export_coreml(art, path: Path) -> Path:
    ct = require("coremltools", "coreml")
    pre = art.preprocess
    # the mirror is taken of the pixels before standardizing, which is the same: standardization is per channel
    model = Probabilities.of(art, nn.Sequential(_StandardizePixels(pre.mean, pre.std), art.model.eval()))
    example = torch.zeros(1, pre.channels, pre.size, pre.size)
    # torch.export, not TorchScript tracing: timm's "same" padding computes sizes in Python ints,
    # which the TorchScript frontend of coremltools 9 cannot convert
    layout = ct.colorlayout.RGB if pre.channels == 3 else ct.colorlayout.GRAYSCALE
    with _quiet("Core ML conversion"):
        program = torch.export.export(model, (example,)).run_decompositions({})
        mlmodel = ct.convert(program, inputs=[ct.ImageType(name="image", shape=example.shape, color_layout=layout)],
                             classifier_config=ct.ClassifierConfig(list(art.classes)), convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS16)
    mlmodel.short_description = f"pixclass {art.arch['name']}: {len(art.classes)} classes"
    mlmodel.user_defined_metadata.update({"pixclass_classes": json.dumps(art.classes),
                                          "pixclass_preprocess": json.dumps(pre.to_dict()),
                                          **answer_metadata(art, "pixclass_", similarity=False)})
    path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(path))
    return path


@dataclass
class SpecCheck:
    """What can be checked of a Core ML file without macOS: its declared interface."""

    format: str
    path: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)
    size_mb: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def rows(self) -> list[tuple[str, str]]:
        return ([("format", self.format), ("file", self.path), ("file size", f"{self.size_mb:.2f} MB")]
                + [(what, f"{'ok' if ok else 'WRONG'}: {detail}") for what, ok, detail in self.checks]
                + [("numerical check", "not possible here: Core ML runs only on Apple platforms"),
                   ("verdict", "PASS" if self.passed else "FAIL")])


def check_coreml(art, path: Path) -> SpecCheck:
    ct = require("coremltools", "coreml")
    result = SpecCheck("coreml (mlprogram)", str(path), size_mb=_size_mb(path))
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:
        result.checks.append(("loads as a spec", False, first_line(e)))
        return result
    pre = art.preprocess
    result.checks.append(("loads as a spec", True, f"Core ML spec version {spec.specificationVersion}"))
    inputs = spec.description.input
    image = inputs[0].type.imageType if len(inputs) == 1 and inputs[0].type.HasField("imageType") else None
    want_space = "RGB" if pre.channels == 3 else "GRAYSCALE"
    space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace) if image else None
    result.checks.append(("input", image is not None and (image.width, image.height) == (pre.size, pre.size)
                          and space == want_space,
                          f"{inputs[0].name if inputs else '-'}: {image.width if image else '?'}x"
                          f"{image.height if image else '?'} {space} image (expected {pre.size}x{pre.size} {want_space})"))
    outputs = {o.name: o for o in spec.description.output}
    label, probs = spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName
    result.checks.append(("outputs", label in outputs and probs in outputs
                          and outputs[probs].type.HasField("dictionaryType"),
                          f"{label} (top class), {probs} (probability of every class)"))
    labels = coreml_class_labels(spec)
    result.checks.append(("class labels", labels == list(art.classes),
                          f"{len(labels)} labels" + ("" if labels == list(art.classes) else f": {labels[:5]}")))
    return result


def coreml_class_labels(spec) -> list[str]:
    """The labels of an ML Program classifier: the `classes` of its classify operation."""
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if op.type != "classify":
                    continue
                value = op.inputs["classes"].arguments[0].value.immediateValue
                if value.HasField("list"):  # a list of one-string tensors
                    return [v.immediateValue.tensor.strings.values[0] for v in value.list.values]
                return list(value.tensor.strings.values)
    return []


def _size_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20
