"""The guide's CNN from scratch on the CIFAR-10 JPEGs at 32 px with the guide's augmentation, for
E epochs: pixclass against the peers ../shared/peers/keras_seed.py (Keras ImageDataGenerator, in its
own venv with tensorflow-cpu) and ../shared/peers/torch_naive.py (ImageFolder + PIL transforms),
all at batch size 32 in the same run. Also the network's pure compute rate (forward, backward and
Adam step on random in-memory tensors) and pixclass's training rate as a fraction of it.

usage: python bench/train_scratch.py [--epochs 1] [--work DIR] [--skip-keras]"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, extract, pixclass_cmd, result_fields, timed  # noqa: E402

KERAS_VENV = ROOT / ".bench" / "keras-venv"


def keras_python() -> str:
    python = KERAS_VENV / "bin" / "python"
    if not python.exists():
        print("creating the Keras peer's venv (tensorflow-cpu) in .bench/ ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(KERAS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "tensorflow-cpu", "pillow", "scipy"], check=True)
    return str(python)


def pure_compute_rate(batch_size: int, seconds: float = 20.0) -> float:
    """Images/s of forward + backward + Adam step of the seed CNN on random tensors in memory."""
    import torch
    from pixclass.models.registry import create_model
    torch.set_num_threads(2)
    model, _ = create_model("classic-cnn", 10, 3, 32)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch_size
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pixclass-bench-"))
    data = extract(SHARED / "datasets" / "cifar10-jpg.tar.gz", work / "data") / "cifar10"
    rows = {}

    out_dir = work / "run-scratch"
    seconds, out = timed(pixclass_cmd("train", data, "--model", "classic-cnn", "--image-size", "32", "--augment", "standard", "--epochs",
                                      args.epochs, "--batch-size", args.batch_size, "--split", "1,0,0",
                                      "--out", out_dir, "--json", "--quiet"),
                         env={"PIXCLASS_CACHE_DIR": str(work / "cache")})
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    history = list(csv.DictReader(open(out_dir / "metrics.csv")))
    train_s = sum(float(r["epoch_s"]) for r in history)
    n_train = 50000 * args.epochs
    rows["pixclass"] = (n_train / train_s, summary["metrics"]["accuracy"], seconds)

    seconds, out = timed([sys.executable, str(SHARED / "peers" / "torch_naive.py"), str(data), "32", str(args.epochs)])
    r = result_fields(out)
    rows["torch_naive"] = (float(r["img_per_s"]), float(r["test_acc"]), seconds)
    if not args.skip_keras:
        seconds, out = timed([keras_python(), str(SHARED / "peers" / "keras_seed.py"), str(data), "32", str(args.epochs)])
        r = result_fields(out)
        rows["keras_seed"] = (float(r["img_per_s"]), float(r["test_acc"]), seconds)

    compute = pure_compute_rate(args.batch_size)
    print(f"CIFAR-10 32 px, guide's CNN, standard augmentation, {args.epochs} epoch(s), batch {args.batch_size}")
    print(f"{'':12} {'train img/s':>12} {'test acc':>9} {'whole command s':>16}")
    for name, (rate, acc, secs) in rows.items():
        print(f"{name:12} {rate:12.0f} {acc:9.4f} {secs:16.1f}")
    ours = rows["pixclass"][0]
    for peer in ("keras_seed", "torch_naive"):
        if peer in rows:
            print(f"pixclass / {peer}: x{ours / rows[peer][0]:.2f} images/s")
    print(f"pure compute (fwd+bwd+Adam, random tensors, channels_last): {compute:.0f} img/s; "
          f"pixclass end-to-end training = {100 * ours / compute:.0f}% of it")


if __name__ == "__main__":
    main()
