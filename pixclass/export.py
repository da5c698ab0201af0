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
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import artifact as artifact_io
from .data.decode import decode_image
from .data.label_csv import is_label_csv
from .data.named import folder_of as named_folder, is_named
from .data.scan import dataset_files
from .data.transforms import Preprocess, batch_to_input, image_to_uint8
from .errors import ImageDecodeError, UserError, first_line
from .fastest_backend import export_onnx
from .inference import Backend, LiteRTBackend, OnnxBackend, TorchBackend, litert_sidecar
from .runs import check_output_location

THRESHOLDS = {"fp32": 0.99, "int8": 0.97}


class _Calibration:
    """Feeds onnxruntime's static quantizer a few hundred preprocessed training images."""

    def __init__(self, inputs: np.ndarray, name: str, batch: int = 16):
        self.batches = iter([{name: inputs[i:i + batch]} for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32_path: Path, out: Path, calibration_inputs: np.ndarray, reporter=None) -> Path:
    """Static int8 (QDQ: uint8 activations, int8 per-channel weights) whose integer arithmetic is
    the same on every x86 CPU. Without VNNI, ONNX Runtime multiplies uint8 by int8 with VPMADDUBSW,
    which adds two neighbouring products into a saturating int16: 255*127 + 255*127 does not fit,
    so on AVX2-only CPUs large sums are clipped while VNNI (and ARM) sum them exactly, and the same
    file answers differently. 7-bit weights (`reduce_range`, ONNX Runtime's advice for non-VNNI
    CPUs: |w| <= 64) keep every pair within 2*255*64 = 32640 < 32767, so nothing saturates anywhere."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    out.parent.mkdir(parents=True, exist_ok=True)  # as export_onnx does: --out may name a new folder
    with tempfile.TemporaryDirectory(prefix="pixclass-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            source = prepared
        except Exception as e:  # pre-processing is an optimisation; quantize the plain graph without it
            from .progress import Reporter
            (reporter or Reporter()).warn(f"ONNX Runtime's quantization pre-processing failed ({first_line(e)}); "
                                          "quantizing the graph as exported")
            source = fp32_path
        quantize_static(str(source), str(out), _Calibration(calibration_inputs, "input"),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
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
        return np.zeros((0, pre.channels, pre.size, pre.size), np.float32), kept
    x = batch_to_input(torch.stack(tensors), pre, memory_format=torch.contiguous_format)
    return x.numpy(), kept


def _run_data(art, model_dir: Path, data: Path | None) -> Path:
    """The folder or label CSV to verify on: --data, else the data the model was trained on."""
    root = data or art.config.get("data", {}).get("path")
    location = _existing_location(root) if root else None
    if location is None:
        raise UserError("no held-out data to verify the export on: pass --data DIR (labelled class folders "
                        "or a label CSV)")
    return location


def _existing_location(data) -> Path | None:
    """Where a dataset argument's images are, if they are there now (a standard dataset only
    from the cache: verifying an export downloads nothing)."""
    if is_named(data):
        folder = named_folder(data)
        return folder if folder.is_dir() else None
    location = Path(data).expanduser()
    return location if location.is_dir() or is_label_csv(location) else None


def held_out_set(art, model_dir: Path, data: Path | None, limit: int = 1000):
    from .evaluate import labelled_files
    paths, labels, what = labelled_files(_run_data(art, model_dir, data), art, model_dir)
    if len(paths) > limit:
        pick = sorted(random.Random(0).sample(range(len(paths)), limit))
        paths, labels = [paths[i] for i in pick], [labels[i] for i in pick]
    return paths, labels, what


# Agreement is a count over images: on 18 images one disagreement is 0.056, more than the whole int8
# margin (1 - 0.97), so the check would demand 100%. On 300 one image moves it by 0.0033.
VERIFY_IMAGES = 300


@dataclass
class VerificationSet:
    """Standardized inputs to compare an export with the original on. The first `len(labels)` are
    the held-out images (accuracy is scored on those); the rest top the set up to VERIFY_IMAGES from
    the data's other images, because agreement needs no held-out labels."""

    inputs: np.ndarray
    labels: np.ndarray
    what: str


def verification_set(art, model_dir: Path, data: Path | None, calibration: list[Path] = ()) -> VerificationSet:
    paths, labels, what = held_out_set(art, model_dir, data)
    inputs, kept = _inputs(paths, art.preprocess)
    if not kept:
        raise UserError("none of the held-out images could be read")
    labels = np.asarray([labels[i] for i in kept])
    if len(labels) >= VERIFY_IMAGES:
        return VerificationSet(inputs, labels, what)
    root = _run_data(art, model_dir, data)
    held = {Path(p).resolve() for p in paths}
    avoid = {Path(p).resolve() for p in calibration}  # the quantizer's scales were set on these: easier
    others = [p for p in dataset_files(root) if p.resolve() not in held]
    random.Random(0).shuffle(others)
    others.sort(key=lambda p: p.resolve() in avoid)
    extra = _inputs(others[:VERIFY_IMAGES - len(labels)], art.preprocess)[0]
    if len(extra):
        what += f" and {len(extra)} other images of {root}"
    return VerificationSet(np.concatenate([inputs, extra]), labels, what)


def calibration_set(art, model_dir: Path, data: Path | None, count: int = 300) -> list[Path]:
    """A seeded sample of training images: the run's own training split where its data is still
    there (so that --data stays images the quantizer never saw), else DATA/train or DATA."""
    from .data.scan import scan_dataset
    trained_on = art.config.get("data", {}).get("path")
    own = bool(trained_on) and _existing_location(trained_on) is not None
    root = _existing_location(trained_on) if own else _run_data(art, model_dir, data)
    manifest = Path(model_dir).parent / "manifest.csv"
    try:
        scanned = scan_dataset(root, manifest=manifest if own and manifest.is_file() else None)
        train = [s.path for s in scanned.samples if s.split == "train"]
    except UserError:
        train = []
    if not train:
        train = dataset_files(root)
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
    n: int  # images agreement is measured on
    threshold: float
    passed: bool
    n_held_out: int = 0  # of those, the held-out ones that accuracy is scored on
    # the feature similarity (abstain knn_similarity) of an export that answers it, against PyTorch's
    max_similarity_diff: float | None = None
    multilabel: bool = False  # the answers compared are label sets, not top classes

    def rows(self) -> list[tuple[str, str]]:
        return [("format", self.format), ("file", self.path), ("images", f"{self.n} ({self.n_held_out} held out)"),
                ("label-set agreement" if self.multilabel else "top-1 agreement",
                 f"{self.agreement:.4f} (needs >= {self.threshold})"),
                ("max |probability difference|", f"{self.max_prob_diff:.2e}"),
                *([("max |similarity difference|", f"{self.max_similarity_diff:.2e}")]
                  if self.max_similarity_diff is not None else []),
                ("held-out accuracy original / export", f"{self.accuracy_original:.4f} / {self.accuracy_export:.4f}"),
                ("file size", f"{self.size_mb:.2f} MB"),
                ("batch-1 latency original / export", f"{self.latency_original_ms:.2f} / {self.latency_ms:.2f} ms"),
                ("verdict", "PASS" if self.passed else "FAIL")]


def _scores_in_chunks(backend: Backend, inputs: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [backend.scores(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)]
    similarity = None if any(s is None for _, s in parts) else np.concatenate([s for _, s in parts])
    return np.concatenate([p for p, _ in parts]), similarity


def verify(reference: Backend, exported: Backend, path: Path, fmt: str, inputs: np.ndarray, labels: np.ndarray,
           threshold: float) -> Verification:
    """Compare an exported model with the reference (the PyTorch artifact) on the same
    standardized inputs N x C x H x W: top-1 agreement and probabilities on all of them, accuracy
    on the first len(labels) (the held-out ones), latency. For a multi-label model the answer
    compared is the set of labels above their thresholds (agreement and accuracy: the same set)."""
    ref, ref_similarity = _scores_in_chunks(reference, inputs)
    got, got_similarity = _scores_in_chunks(exported, inputs)
    answers = partial(_answers, thresholds=reference.thresholds)
    agreement = _share_equal(answers(ref), answers(got))
    held = len(labels)
    truth = labels > 0.5 if reference.multilabel else labels
    similarity_diff = (float(np.abs(ref_similarity - got_similarity).max())
                       if ref_similarity is not None and got_similarity is not None else None)
    return Verification(fmt, str(path), agreement, float(np.abs(ref - got).max()),
                        _share_equal(answers(ref[:held]), truth), _share_equal(answers(got[:held]), truth),
                        Path(path).stat().st_size / 2**20, _latency_ms(exported.probabilities, inputs[:1]),
                        _latency_ms(reference.probabilities, inputs[:1]), len(inputs), threshold,
                        agreement >= threshold, held, similarity_diff, reference.multilabel)


def _answers(probs: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """The top class per image, or a multi-label model's yes/no per class (N x K)."""
    return probs.argmax(1) if thresholds is None else probs >= np.asarray(thresholds, dtype=np.float32)


def _share_equal(a: np.ndarray, b: np.ndarray) -> float:
    """The share of images whose answers are equal (every label of a multi-label answer)."""
    same = a == b
    return float((same.all(axis=1) if same.ndim == 2 else same).mean()) if len(a) else 0.0


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
    # the abstain threshold is applied by app.js to the graph's outputs (the calibrated
    # probabilities, or the feature similarity of its second output)
    (folder / "meta.json").write_text(json.dumps({"classes": art.classes, "preprocess": art.preprocess.to_dict(),
                                                  "temperature": art.temperature,
                                                  "abstain": art.abstain.to_dict() if art.abstain else None,
                                                  "thresholds": art.thresholds}))
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
    if fmt == "webapp":
        folder = Path(out) if out else model_dir.parent / "webapp"
        check_destination(fmt, folder, model_dir)
        out = folder / "model.onnx"
    else:
        out = Path(out) if out else model_dir / f"model{'.int8' if int8 else ''}{SUFFIXES[fmt]}"
        check_destination(fmt, out, model_dir)
    art = artifact_io.load(model_dir)
    kind = "int8" if int8 else "fp32"
    if fmt == "webapp":
        build_webapp(art, folder)
    if fmt == "coreml":
        from .export_mobile import check_coreml, export_coreml
        if reporter:
            reporter.info("converting to Core ML (an ML Program)")
        result = check_coreml(art, export_coreml(art, out))
        if not result.passed:
            result.path = str(_set_aside(out))
        return result
    calibration = calibration_set(art, model_dir, data) if int8 else []
    verifying = verification_set(art, model_dir, data, calibration)
    if reporter:
        reporter.info(f"verifying on {len(verifying.inputs)} images: {verifying.what}")
        if len(verifying.inputs) < VERIFY_IMAGES:
            reporter.warn(f"only {len(verifying.inputs)} images to verify on: one disagreement moves the "
                          f"agreement by {1 / len(verifying.inputs):.3f}; --data DIR can give more")
    calib = _inputs(calibration, art.preprocess)[0] if int8 else None
    exported = _write_and_open(art, fmt, out, calib, reporter)
    # the reference backend is made after the export: it reorders the weights' memory in place. It
    # applies the artifact's test-time augmentation, as the exported graph does
    reference = TorchBackend.from_artifact(art)
    name = "webapp (onnx fp32)" if fmt == "webapp" else f"{fmt} {kind}"
    result = verify(reference, exported, out, name, verifying.inputs, verifying.labels,
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
        import tempfile
        with tempfile.TemporaryDirectory(prefix="pixclass-export-") as work:
            quantize_int8(export_onnx(art, Path(work) / "model.fp32.onnx"), out, calibration, reporter)
    elif fmt == "onnx":
        export_onnx(art, out)
    return OnnxBackend(out)


def _written_paths(fmt: str, out: Path) -> list[Path]:
    """What an export to `out` creates or replaces: the file (a folder for Core ML and the web app),
    its `.unverified` name and, for TFLite, the JSON beside it."""
    if fmt == "webapp":
        return [out]
    paths = [out, out.with_name(out.name + ".unverified")]
    return paths + [litert_sidecar(out)] if fmt == "tflite" else paths


def _is_earlier_export(fmt: str, path: Path) -> bool:
    """Whether an existing `path` is something an earlier export of this format wrote, which a new
    export may replace; anything else (the user's own files) is never overwritten."""
    try:
        if path.is_symlink():
            return False
        if fmt in ("coreml", "webapp"):  # both write folders
            if not path.is_dir():
                return False
            names = {p.name for p in path.iterdir()}
            mine = {"Manifest.json"} if fmt == "coreml" else {"index.html", "meta.json", "sw.js"}
            return not names or mine <= names
        if not path.is_file():
            return False
        if fmt == "tflite":
            if path.name.endswith(".json"):
                return {"classes", "preprocess"} <= set(json.loads(path.read_text()))
            with open(path, "rb") as f:
                return f.read(8)[4:] == b"TFL3"  # the FlatBuffer file identifier of a TFLite model
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        return any(p.key == "pixclass_classes" for p in proto.metadata_props)
    except Exception:  # unreadable or not the format: not ours
        return False


def check_destination(fmt: str, out: Path, model_dir: Path) -> None:
    """Refuse, before any work, an --out that would replace the model folder or one of its files,
    overwrite a file that is not an earlier export, or cannot be written."""
    import os
    model_dir = Path(model_dir).resolve()
    own_files = [f for f in (model_dir / artifact_io.WEIGHTS_FILE, model_dir / artifact_io.META_FILE) if f.is_file()]
    for path in _written_paths(fmt, out):
        target = path.resolve()
        if target == model_dir or target in model_dir.parents:
            raise UserError(f"--out {out} would replace the model folder {model_dir}; choose a new name")
        if any(target == f or (path.exists() and os.path.samefile(path, f)) for f in own_files):
            raise UserError(f"--out {out} would overwrite the model's own {target.name}; choose a new name")
        if (path.exists() or path.is_symlink()) and not _is_earlier_export(fmt, path):
            raise UserError(f"--out {out}: {path} already exists and is not an earlier export; "
                            "remove it or choose another name")
    check_output_location(out, folder=out if fmt == "webapp" and out.is_dir() else out.parent)


def _set_aside(out: Path) -> Path:
    """An export that failed its check keeps its file, renamed so nobody ships it by mistake."""
    unverified = out.with_name(out.name + ".unverified")
    if unverified.exists():
        import shutil
        shutil.rmtree(unverified) if unverified.is_dir() else unverified.unlink()
    out.replace(unverified)
    return unverified
