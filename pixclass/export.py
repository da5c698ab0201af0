"""Export a saved model for deployment and check that the export answers like the original.

Formats: ONNX (opset 17, dynamic batch, softmax output, class names and preprocessing in the
file's metadata), static int8 ONNX (onnxruntime quantization, calibrated on training images),
TFLite fp32/int8 and Core ML (export_mobile.py), and a phone web app around the ONNX file.
Every export is re-scored on held-out images against the PyTorch artifact: top-1 agreement, max
probability difference, accuracy of both, file size and batch-1 latency. Below the agreement
threshold the file is kept with an `.unverified` suffix and the export fails."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import artifact as artifact_io
from .data.decode import decode_image
from .data.scan import collect_image_paths
from .data.transforms import Preprocess, batch_to_input, image_to_uint8
from .errors import ImageDecodeError, UserError, first_line
from .inference import Backend, LiteRTBackend, OnnxBackend, Probabilities, TorchBackend

OPSET = 17
THRESHOLDS = {"fp32": 0.99, "int8": 0.97}


def metadata(art) -> dict[str, str]:
    return {"pixclass_classes": json.dumps(art.classes), "pixclass_preprocess": json.dumps(art.preprocess.to_dict()),
            "pixclass_arch": json.dumps(art.arch)}


def export_onnx(art, path: Path) -> Path:
    import onnx
    pre = art.preprocess
    model = Probabilities(art.model.eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, pre.channels, pre.size, pre.size), str(path), input_names=["input"],
                      output_names=["probabilities"],
                      dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(path))
    for key, value in metadata(art).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


class _Calibration:
    """Feeds onnxruntime's static quantizer a few hundred preprocessed training images."""

    def __init__(self, inputs: np.ndarray, name: str, batch: int = 16):
        self.batches = iter([{name: inputs[i:i + batch]} for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32_path: Path, out: Path, calibration_inputs: np.ndarray, reporter=None) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = out.with_name(out.stem + ".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception as e:  # pre-processing is an optimisation; quantize the plain graph without it
        from .progress import Reporter
        (reporter or Reporter()).warn(f"ONNX Runtime's quantization pre-processing failed ({first_line(e)}); "
                                      "quantizing the graph as exported")
        source = fp32_path
    quantize_static(str(source), str(out), _Calibration(calibration_inputs, "input"), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)
    import onnx
    proto, meta = onnx.load(str(out)), onnx.load(str(fp32_path)).metadata_props
    del proto.metadata_props[:]
    proto.metadata_props.extend(meta)
    onnx.save(proto, str(out))
    return out


def _inputs(paths: list[Path], pre: Preprocess) -> tuple[np.ndarray, list[int]]:
    tensors, kept = [], []
    for i, p in enumerate(paths):
        try:
            tensors.append(image_to_uint8(decode_image(p, pre.channels), pre))
            kept.append(i)
        except ImageDecodeError:
            continue
    if not tensors:
        raise UserError("none of the held-out images could be read")
    x = batch_to_input(torch.stack(tensors), pre, memory_format=torch.contiguous_format)
    return x.numpy(), kept


def _run_data(art, model_dir: Path, data: Path | None):
    root = data or art.config.get("data", {}).get("path")
    if not root or not Path(root).is_dir():
        raise UserError("no held-out data to verify the export on: pass --data DIR (labelled class folders)")
    return Path(root)


def held_out_set(art, model_dir: Path, data: Path | None, limit: int = 1000):
    from .evaluate import labelled_files
    paths, labels, what = labelled_files(_run_data(art, model_dir, data), art, model_dir)
    if len(paths) > limit:
        pick = sorted(random.Random(0).sample(range(len(paths)), limit))
        paths, labels = [paths[i] for i in pick], [labels[i] for i in pick]
    return paths, labels, what


def calibration_set(art, model_dir: Path, data: Path | None, count: int = 300) -> list[Path]:
    """A seeded sample of training images (the run's manifest, or DATA/train)."""
    from .data.scan import scan_dataset
    root = _run_data(art, model_dir, data)
    manifest = Path(model_dir).parent / "manifest.csv"
    try:
        scanned = scan_dataset(root, manifest=manifest if manifest.is_file() else None)
        train = [s.path for s in scanned.samples if s.split == "train"]
    except UserError:
        train = []
    if not train:
        train = collect_image_paths([root])
    return sorted(random.Random(0).sample(train, min(count, len(train))))


def _latency_ms(fn, x: np.ndarray, runs: int = 30) -> float:
    fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass
class Verification:
    format: str
    path: str
    agreement: float
    max_prob_diff: float
    accuracy_original: float
    accuracy_export: float
    size_mb: float
    latency_ms: float
    latency_original_ms: float
    n: int
    threshold: float
    passed: bool

    def rows(self) -> list[tuple[str, str]]:
        return [("format", self.format), ("file", self.path), ("images", str(self.n)),
                ("top-1 agreement", f"{self.agreement:.4f} (needs >= {self.threshold})"),
                ("max |probability difference|", f"{self.max_prob_diff:.2e}"),
                ("accuracy original / export", f"{self.accuracy_original:.4f} / {self.accuracy_export:.4f}"),
                ("file size", f"{self.size_mb:.2f} MB"),
                ("batch-1 latency original / export", f"{self.latency_original_ms:.2f} / {self.latency_ms:.2f} ms"),
                ("verdict", "PASS" if self.passed else "FAIL")]


def _probabilities_in_chunks(backend: Backend, inputs: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([backend.probabilities(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])


def verify(reference: Backend, exported: Backend, path: Path, fmt: str, inputs: np.ndarray, labels: np.ndarray,
           threshold: float) -> Verification:
    """Compare an exported model with the reference (the PyTorch artifact) on the same
    standardized inputs N x C x H x W: top-1 agreement, probabilities, accuracy and latency."""
    ref = _probabilities_in_chunks(reference, inputs)
    got = _probabilities_in_chunks(exported, inputs)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    return Verification(fmt, str(path), agreement, float(np.abs(ref - got).max()),
                        float((ref.argmax(1) == labels).mean()), float((got.argmax(1) == labels).mean()),
                        Path(path).stat().st_size / 2**20, _latency_ms(exported.probabilities, inputs[:1]),
                        _latency_ms(reference.probabilities, inputs[:1]), len(labels), threshold,
                        agreement >= threshold)


ORT_WEB_VERSION = "1.30.0"
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


def _ort_web_tarball() -> Path:
    """onnxruntime-web from the npm registry, fetched once with `npm pack` and kept in the cache."""
    import shutil
    import subprocess
    from .cache import cache_root
    folder = cache_root() / "npm"
    tarball = folder / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("the web app needs onnxruntime-web from the npm registry, and npm is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--silent"], cwd=folder,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tarball.is_file():
        said = (proc.stderr or proc.stdout).strip()
        why = said.splitlines()[-1] if said else proc.returncode  # npm puts the reason last
        raise UserError(f"could not fetch onnxruntime-web {ORT_WEB_VERSION} with npm: {why}")
    return tarball


def build_webapp(art, folder: Path) -> Path:
    """A static folder that classifies photos in a phone's browser, offline after the first load."""
    import shutil
    import tarfile
    from importlib.resources import files
    folder.mkdir(parents=True, exist_ok=True)
    templates = files("pixclass") / "webapp"
    for name in ("index.html", "app.js", "manifest.webmanifest", "sw.js"):
        (folder / name).write_text((templates / name).read_text())
    export_onnx(art, folder / "model.onnx")
    (folder / "meta.json").write_text(json.dumps({"classes": art.classes, "preprocess": art.preprocess.to_dict()}))
    with tarfile.open(_ort_web_tarball()) as tar:
        for name in ORT_WEB_FILES:
            with tar.extractfile(f"package/dist/{name}") as src, open(folder / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    from .cache import digest
    version = digest((folder / "model.onnx").read_bytes(), (folder / "app.js").read_text())[:12]
    (folder / "sw.js").write_text((folder / "sw.js").read_text().replace("__VERSION__", version))
    return folder


FORMATS = ("onnx", "tflite", "coreml", "webapp")
SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}


def export(model_dir: Path, fmt: str = "onnx", int8: bool = False, out: Path | None = None, data: Path | None = None,
           threshold: float | None = None, reporter=None):
    """Write the export and check it: a Verification (scored on held-out images), or for Core ML,
    which cannot run here, a SpecCheck of its declared interface."""
    model_dir = Path(model_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if fmt in ("webapp", "coreml") and int8:
        what = "the web app ships" if fmt == "webapp" else "Core ML export writes"
        raise UserError(f"{what} the float model; drop --int8")
    art = artifact_io.load(model_dir)
    kind = "int8" if int8 else "fp32"
    if fmt == "webapp":
        folder = Path(out) if out else model_dir.parent / "webapp"
        build_webapp(art, folder)
        out = folder / "model.onnx"
    out = Path(out) if out else model_dir / f"model{'.int8' if int8 else ''}{SUFFIXES[fmt]}"
    if fmt == "coreml":
        from .export_mobile import check_coreml, export_coreml
        if reporter:
            reporter.info("converting to Core ML (an ML Program)")
        result = check_coreml(art, export_coreml(art, out))
        if not result.passed:
            result.path = str(_set_aside(out))
        return result
    paths, labels, what = held_out_set(art, model_dir, data)
    inputs, kept = _inputs(paths, art.preprocess)
    labels = np.asarray([labels[i] for i in kept])
    if reporter:
        reporter.info(f"verifying on {len(labels)} images from {what}")
    calib = _inputs(calibration_set(art, model_dir, data), art.preprocess)[0] if int8 else None
    exported = _write_and_open(art, fmt, out, calib, reporter)
    # the reference backend is made after the export: it reorders the weights' memory in place
    reference = TorchBackend.from_artifact(art)
    name = "webapp (onnx fp32)" if fmt == "webapp" else f"{fmt} {kind}"
    result = verify(reference, exported, out, name, inputs, labels,
                    threshold if threshold is not None else THRESHOLDS[kind])
    if not result.passed:
        result.path = str(_set_aside(out))
    return result


def _write_and_open(art, fmt: str, out: Path, calibration: np.ndarray | None, reporter=None) -> Backend:
    """Write the ONNX or TFLite file (int8 when `calibration` inputs are given; the web app's
    model.onnx is already written) and open it in its backend for verification."""
    if fmt == "tflite":
        from .export_mobile import export_tflite
        if reporter:
            int8 = " and quantizing to int8" if calibration is not None else ""
            reporter.info(f"converting to TFLite with litert-torch{int8}")
        export_tflite(art, out, calibration)
        return LiteRTBackend(out)
    if calibration is not None:
        fp32 = export_onnx(art, out.with_name(out.stem + ".fp32-tmp.onnx"))
        quantize_int8(fp32, out, calibration, reporter)
        fp32.unlink()
    elif fmt == "onnx":
        export_onnx(art, out)
    return OnnxBackend(out)


def _set_aside(out: Path) -> Path:
    """An export that failed its check keeps its file, renamed so nobody ships it by mistake."""
    unverified = out.with_name(out.name + ".unverified")
    if unverified.exists():
        import shutil
        shutil.rmtree(unverified) if unverified.is_dir() else unverified.unlink()
    out.replace(unverified)
    return unverified
