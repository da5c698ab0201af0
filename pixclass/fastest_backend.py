"""The fastest backend that answers like a saved model: its ONNX export in ONNX Runtime (several
times PyTorch eager's speed on a CPU at small batches; bench/RESULTS.md), checked against the
PyTorch model before it is used, with PyTorch as the fallback.

The export is cached under the cache root, keyed by the model folder's two files, so only the
first call for a model pays for it; the check runs on every open, because a cached file could
have been written by another ONNX Runtime or torch version."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import artifact as artifact_io
from .cache import cache_root, digest
from .errors import UserError, first_line
from .inference import MODEL_SUFFIXES, Backend, OnnxBackend, TorchBackend, network_of, open_backend
from .progress import warn

OPSET = 17
BACKENDS = ("auto", "onnxruntime", "torch")
# largest difference in any class's probability that still counts as the same answer: float32
# kernels differ in summation order, never by this much on a correct export
AGREEMENT_TOLERANCE = 1e-3


def onnx_metadata(art) -> dict[str, str]:
    # pixclass_tta and pixclass_temperature say what the graph already does (Probabilities): nothing
    # reads them to apply them again; pixclass_abstain is applied to the graph's outputs (its
    # probabilities, or the feature similarity its second output gives)
    return {"pixclass_classes": json.dumps(art.classes), "pixclass_preprocess": json.dumps(art.preprocess.to_dict()),
            "pixclass_arch": json.dumps(art.arch), **answer_metadata(art, "pixclass_")}


def answer_metadata(art, prefix: str = "", similarity: bool = True) -> dict[str, str]:
    """What every export says of how its probabilities are made and read, as text values: the
    test-time augmentation and calibration temperature its graph applies, the abstain threshold
    (JSON; "null": never unknown) its reader applies, the task ("multilabel": the graph ends in a
    sigmoid per class) and a multi-label model's per-class thresholds (JSON; "null" otherwise).
    `similarity=False`: a graph with the probabilities alone (TFLite, Core ML), whose abstain
    threshold is the max_probability fallback."""
    abstain = art.abstain.applied(similarity) if art.abstain is not None else None
    return {f"{prefix}tta": art.tta, f"{prefix}temperature": repr(float(art.temperature)),
            f"{prefix}abstain": json.dumps(abstain.to_dict() if abstain else None),
            f"{prefix}task": art.task, f"{prefix}thresholds": json.dumps(art.thresholds)}


def export_onnx(art, path: Path) -> Path:
    """The artifact's network with its softmax (and its TTA) as an ONNX file with a dynamic batch,
    its classes and preprocessing in the file's metadata."""
    import onnx
    pre = art.preprocess
    # the wrapper in eval mode too: the exporter restores the mode it found, and a wrapper left in
    # training mode would put the artifact's model back into it (BatchNorm then updates its statistics)
    # with a feature bank, a second output "similarity" (feature_bank.Scores) for knn_similarity
    model = network_of(art.model, art.tta, art.temperature, art.feature_bank, art.multilabel)
    outputs = ["probabilities"] + (["similarity"] if art.feature_bank is not None else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, pre.channels, pre.size, pre.size), str(path), input_names=["input"],
                      output_names=outputs, dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                      opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(path))
    for key, value in onnx_metadata(art).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str  # one line for the log: which backend, and why not the faster one


def check_inputs(backend: Backend, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Seeded uint8 images at the model's size: smooth noise, so the network sees edges and
    areas as in photos rather than pixel static that saturates every activation alike."""
    pre = backend.preprocess
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (count, pre.channels, 8, 8), generator=g).float()
    images = torch.nn.functional.interpolate(low, size=(pre.size, pre.size), mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8)


def agreement(reference: Backend, candidate: Backend, inputs: torch.Tensor) -> float:
    """The largest difference in any probability (or feature similarity) between the two backends
    on `inputs`."""
    (a, sim_a), (b, sim_b) = reference.scores_uint8(inputs), candidate.scores_uint8(inputs)
    if a.shape != b.shape or (sim_a is None) != (sim_b is None):
        return float("inf")
    return float(max(np.abs(a - b).max(), np.abs(sim_a - sim_b).max() if sim_a is not None else 0.0))


def _cached_export(art, model_dir: Path) -> Path:
    key = digest((model_dir / artifact_io.WEIGHTS_FILE).read_bytes(), (model_dir / artifact_io.META_FILE).read_bytes(),
                 torch.__version__, OPSET)
    path = cache_root() / "onnx" / f"{key}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # written beside its final name and renamed: two processes exporting at once each
        # publish a whole file, never a half-written one
        fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
        os.close(fd)
        try:
            export_onnx(art, Path(tmp))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def open_fastest(model, backend: str = "auto", threads: int | None = None, spinning: bool = True) -> Choice:
    """A saved model folder -> the fastest backend that agrees with its PyTorch model (`auto`), or
    the one asked for (`onnxruntime` fails with one line where it cannot be used; `torch`). An
    .onnx or .tflite file is run as it is. `threads` and `spinning` configure an ONNX Runtime
    session (OnnxBackend)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    path = Path(model).expanduser()
    if path.suffix in MODEL_SUFFIXES:
        if backend == "torch":
            raise UserError(f"--backend torch needs a saved model folder, not {path.name}")
        opened = open_backend(path)
        return Choice(opened, f"{opened.name} ({path.name})")
    art = artifact_io.load(path)  # its own one-line error for a bad folder
    reference = TorchBackend.from_artifact(art)
    if backend == "torch":
        return Choice(reference, "torch (asked for)")
    try:
        candidate = OnnxBackend(_cached_export(art, path), threads=threads, spinning=spinning)
        difference = agreement(reference, candidate, check_inputs(reference))
    except Exception as e:  # a missing ONNX Runtime, an operator the exporter lacks: PyTorch still answers
        why = f"ONNX export or ONNX Runtime failed ({type(e).__name__}: {first_line(e)})"
    else:
        if difference <= AGREEMENT_TOLERANCE:
            return Choice(candidate, f"onnxruntime (agrees with torch within {difference:.1e})")
        why = f"the ONNX export differs from the PyTorch model by up to {difference:.3g} in a probability"
    if backend == "onnxruntime":
        raise UserError(f"--backend onnxruntime: {why}")
    warn(f"{why}; running the PyTorch model")
    return Choice(reference, f"torch ({why})")
