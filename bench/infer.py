"""Prediction speed of a saved model: throughput (batch 64) and batch-1 latency, in PyTorch eager
(as `pixclass predict` runs it) and in ONNX Runtime on an ONNX export of the same network, with
the top-1 agreement between the two on random inputs.

usage: python bench/infer.py MODEL_DIR   (or --model efficientnet_lite0 for an untrained network)"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rate(fn, x, seconds=5.0) -> float:
    fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def _latency_ms(fn, x, runs=50) -> float:
    fn(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--model", default=None, help="an architecture name instead of a saved model")
    parser.add_argument("--classes", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model_dir:
        from pixclass import artifact
        art = artifact.load(args.model_dir)
        model, size, channels, name = art.model, art.preprocess.size, art.preprocess.channels, art.arch["name"]
    else:
        from pixclass.config import ModelConfig
        from pixclass.models.registry import create_model
        from pixclass.models.pretrained import pretrained_preprocess
        model, _ = create_model(args.model, args.classes, 3, 224, ModelConfig(name=args.model))
        size = pretrained_preprocess(model.backbone).size if hasattr(model, "backbone") else 224
        channels, name = 3, args.model
    model = model.eval().to(memory_format=torch.channels_last)

    def torch_fn(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    import onnxruntime as ort
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(model, torch.zeros(1, channels, size, size), str(onnx_path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def ort_fn(x):
        return session.run(None, {"x": x})[0]

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((64, channels, size, size)).astype(np.float32)
    one = batch[:1]
    agree = float((torch_fn(batch).argmax(1) == ort_fn(batch).argmax(1)).mean())
    rows = [(label, _rate(fn, batch), _latency_ms(fn, one)) for label, fn in (("pytorch eager", torch_fn),
                                                                               ("onnxruntime", ort_fn))]
    print(f"{name} at {size}x{size}, 2 threads")
    print(f"{'':14} {'batch-64 img/s':>15} {'batch-1 latency ms':>19}")
    for label, rate, lat in rows:
        print(f"{label:14} {rate:15.1f} {lat:19.2f}")
    print(f"onnxruntime vs pytorch: x{rows[0][2] / rows[1][2]:.2f} faster at batch 1, "
          f"x{rows[1][1] / rows[0][1]:.2f} throughput; top-1 agreement {agree:.4f}")


if __name__ == "__main__":
    main()
