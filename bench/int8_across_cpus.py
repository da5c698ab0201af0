"""Does the int8 ONNX export answer the same on a CPU without VNNI? One quantization per setting,
scored by ONNX Runtime on this CPU and on an AVX2-only CPU (the same process under
bench/cpuid_avx2_only.c, which hides AVX-512, VNNI and AMX through Linux's CPUID faulting).

    python bench/int8_across_cpus.py MODEL_DIR [--data VERIFY_DIR] [--work DIR]
    python bench/int8_across_cpus.py --test-model [--work DIR]   # tests/test_export.py's model and data

Settings: "before" is the call export.py made until issue 16 (QDQ, uint8 activations, int8
per-channel weights, full range); "after" is pixclass.export.quantize_int8 (the same with 7-bit
weights). Both are calibrated on the same training images and scored on pixclass export's own
verification set against the PyTorch model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def _quantize_before(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pixclass.export import _Calibration
    prepared = out.with_name("before.prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), _Calibration(calibration, "input"), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)


def test_model(work: Path) -> tuple[Path, Path]:
    """The model of tests/conftest.py's trained_run and test_export.py's 300 verification images."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from conftest import make_shapes

    from pixclass.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from pixclass.progress import Reporter
    from pixclass.train.run import run_training
    shapes = make_shapes(work / "shapes", per_class=40)
    cfg = RunConfig(data=DataConfig(path=str(shapes), image_size=32), model=ModelConfig(name="classic-cnn"),
                    augment=AugmentConfig(policy="none"), train=TrainConfig(epochs=12, batch_size=16, seed=0))
    run = run_training(cfg, out=work / "run", reporter=Reporter(quiet=True))
    return Path(run["model_dir"]), make_shapes(work / "verify", per_class=100, seed=1)


def prepare(model_dir: Path, data: Path | None, work: Path) -> None:
    from pixclass import artifact
    from pixclass.export import (
        _inputs,
        _probabilities_in_chunks,
        calibration_set,
        export_onnx,
        quantize_int8,
        verification_set,
    )
    from pixclass.inference import TorchBackend
    art = artifact.load(model_dir)
    calibration_paths = calibration_set(art, model_dir, data)
    calibration = _inputs(calibration_paths, art.preprocess)[0]
    verifying = verification_set(art, model_dir, data, calibration_paths)
    fp32 = export_onnx(art, work / "fp32.onnx")
    _quantize_before(fp32, work / "before.onnx", calibration)
    quantize_int8(fp32, work / "after.onnx", calibration)
    np.save(work / "inputs.npy", verifying.inputs)
    np.save(work / "torch.npy", _probabilities_in_chunks(TorchBackend.from_artifact(art), verifying.inputs))
    print(f"{len(verifying.inputs)} images: {verifying.what}; {len(calibration)} calibration images")


def score(work: Path, cpu: str) -> None:
    """Probabilities of every file for the saved inputs, in this process (whatever CPU it sees)."""
    from pixclass.export import _probabilities_in_chunks
    from pixclass.inference import OnnxBackend
    inputs = np.load(work / "inputs.npy")
    for name in ("fp32", "before", "after"):
        np.save(work / f"{name}-{cpu}.npy", _probabilities_in_chunks(OnnxBackend(work / f"{name}.onnx"), inputs))


def _max_abs_weight(path: Path) -> int:
    import onnx
    from onnx import TensorProto, numpy_helper
    proto = onnx.load(str(path))
    dq = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return max(int(np.abs(numpy_helper.to_array(t).astype(int)).max()) for t in proto.graph.initializer
               if t.name in dq and t.data_type == TensorProto.INT8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--test-model", action="store_true", help="train and use the test suite's model")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--score", choices=("native", "avx2"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        return score(args.work, args.score)
    work = args.work or Path(tempfile.mkdtemp(prefix="int8-cpus-"))
    work.mkdir(parents=True, exist_ok=True)
    shim = work / "cpuid_avx2_only.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(BENCH / "cpuid_avx2_only.c")], check=True)
    if args.test_model:
        args.model_dir, args.data = test_model(work)
    prepare(args.model_dir, args.data, work)
    for cpu, extra in (("native", {}), ("avx2", {"LD_PRELOAD": str(shim)})):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"} | extra
        subprocess.run([sys.executable, __file__, "--score", cpu, "--work", str(work)], env=env, check=True)
    ref = np.load(work / "torch.npy")
    print(f"{'file':8} {'max|w|':>6} {'cpu':7} {'agreement':>10} {'max prob diff':>14} {'top-1 changed':>14} "
          f"{'max diff between CPUs':>22}")
    for name in ("fp32", "before", "after"):
        both = {cpu: np.load(work / f"{name}-{cpu}.npy") for cpu in ("native", "avx2")}
        between = float(np.abs(both["native"] - both["avx2"]).max())
        changed = int((both["native"].argmax(1) != both["avx2"].argmax(1)).sum())
        weight = "-" if name == "fp32" else str(_max_abs_weight(work / f"{name}.onnx"))
        for cpu, probs in both.items():
            agreement = float((probs.argmax(1) == ref.argmax(1)).mean())
            print(f"{name:8} {weight:>6} {cpu:7} {agreement:10.4f} {np.abs(probs - ref).max():14.2e} "
                  f"{changed:>8}/{len(ref)} {between:22.2e}")


if __name__ == "__main__":
    main()
