"""Robustness acceptance (issue 20, items 3-4): a classic CNN trained on CIFAR-10 with and without
`--adversarial`, the same epochs, for each seed; then `pixclass robustness` on the test images of
each model. Reports clean accuracy, PGD accuracy at the training ε and at 8/255, and the gains.

    python bench/robustness.py --data /tmp/d/cifar10 --epochs 8 --seeds 0 1 --out /tmp/rb/bench
    python bench/robustness.py --step-cost      # one training step: plain, with fast FGSM (ours), with ART's

`--per-class N` trains on the first N images of each class of train/ (symlinks in OUT/data) when the
machine cannot afford all 50,000."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import pixclass_cmd, timed


def subset(data: Path, out: Path, per_class: int | None, test_per_class: int | None) -> Path:
    if not per_class:
        return data
    root = out / "data"
    for split, n in (("train", per_class), ("test", test_per_class)):
        for folder in sorted((data / split).iterdir()):
            dest = root / split / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:n]:
                if not (dest / f.name).exists():
                    (dest / f.name).symlink_to(f.resolve())
    return root


def one_model(data: Path, out: Path, seed: int, epochs: int, adversarial: bool, eps: float, limit: int) -> dict:
    name = f"{'adv' if adversarial else 'std'}-s{seed}"
    args = ["train", data, "--model", "classic-cnn", "--image-size", 32, "--epochs", epochs, "--seed", seed,
            "--out", out / name, "--json", "-q"]
    if adversarial:
        args += ["--adversarial", "--adversarial-eps", eps]
    train_s, output = timed(pixclass_cmd(*args))
    summary = json.loads(output[output.index("{"):output.rindex("}") + 1])
    rob_s, output = timed(pixclass_cmd("robustness", out / name / "model", data, "--limit", limit,
                                       "--eps", f"{eps:g},8", "--json", "-q", "--out", out / f"{name}-robustness"))
    rob = json.loads(output[output.index("{"):output.rindex("}") + 1])
    pgd = {r["eps_255"]: r["accuracy"] for r in rob["attacks"]["pgd"]}
    row = {"model": name, "train_s": round(train_s, 1), "robustness_s": round(rob_s, 1),
           "run_accuracy": summary["metrics"]["accuracy"], "clean": rob["clean_accuracy"], "pgd_eps": pgd[eps],
           "pgd_8": pgd[8.0], "images": rob["images"]}
    print(json.dumps(row), flush=True)
    return row


def step_cost(repeats: int = 20) -> None:
    """Seconds per training step of a classic CNN (batch 64, 32 px): plain, with our fast FGSM,
    with ART's fast FGSM (its PGD, one step of 1.25 ε from a random start)."""
    import numpy as np
    import torch

    from pixclass.attacks import make_attack, art_classifier
    from pixclass.config import ModelConfig
    from pixclass.data.transforms import Preprocess, normalize
    from pixclass.models.registry import create_model
    from pixclass.train.adversarial import FastAdversary
    model, _ = create_model("classic-cnn", 10, 3, 32, ModelConfig(name="classic-cnn"))
    model = model.to(memory_format=torch.channels_last)
    pre, eps = Preprocess(32), 2 / 255
    x = torch.rand(64, 3, 32, 32)
    labels = torch.randint(0, 10, (64,))
    ours = FastAdversary(model, pre, eps)
    art_attack = make_attack(art_classifier(model, pre, 10), "pgd", eps, batch_size=64, steps=1)
    art_attack.set_params(eps_step=1.25 * eps)

    def plain(batch):
        return batch

    def with_ours(batch):
        return ours(batch, labels)

    def with_art(batch):
        pixels = (batch * torch.tensor(pre.std).view(1, -1, 1, 1) + torch.tensor(pre.mean).view(1, -1, 1, 1))
        adv = art_attack.generate(pixels.numpy(), y=labels.numpy())
        model.train()
        return normalize(torch.from_numpy(adv), pre).contiguous(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for name, make in (("plain", plain), ("fast FGSM (pixclass)", with_ours), ("fast FGSM (ART PGD, 1 step)", with_art)):
        times = []
        for i in range(repeats + 3):
            t = time.perf_counter()
            model.train()
            batch = make(normalize(x, pre).contiguous(memory_format=torch.channels_last))
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 3:
                times.append(time.perf_counter() - t)
        print(f"{name}: {1000 * statistics.median(times):.1f} ms per step (median of {repeats})", flush=True)
    np.random.seed(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("/tmp/d/cifar10"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/rb/bench"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eps", type=float, default=2.0, help="training ε and PGD ε judged, 1/255 steps")
    parser.add_argument("--limit", type=int, default=1000, help="test images for pixclass robustness")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--step-cost", action="store_true")
    a = parser.parse_args()
    if a.step_cost:
        step_cost()
        return
    data = subset(a.data, a.out, a.per_class, a.test_per_class or a.per_class)
    rows = [one_model(data, a.out, seed, a.epochs, adv, a.eps, a.limit) for seed in a.seeds for adv in (False, True)]
    mean = {kind: {k: statistics.mean(r[k] for r in rows if r["model"].startswith(kind))
                   for k in ("clean", "pgd_eps", "pgd_8", "train_s")} for kind in ("std", "adv")}
    print(json.dumps(mean), flush=True)
    gain = mean["adv"]["pgd_eps"] - mean["std"]["pgd_eps"]
    cost = mean["std"]["clean"] - mean["adv"]["clean"]
    print(f"RESULT pgd{a.eps:g}_gain_points={100 * gain:.1f} clean_cost_points={100 * cost:.1f} "
          f"std_pgd8_over_clean={mean['std']['pgd_8'] / mean['std']['clean']:.3f}")


if __name__ == "__main__":
    main()
