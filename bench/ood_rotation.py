"""Rotation prediction as a training-time auxiliary task for near-OOD (issue 20, acceptance 2).

Hendrycks et al. 2019 ("Using self-supervised learning can improve model robustness and
uncertainty"): beside the class head, a second linear head on the same pooled features learns
which of 0/90/180/270 degrees an image was turned by; an image unlike the training data is also
one whose rotation the network cannot tell. This trains airbench the way the fast recipe does
(same data in memory, crops, alternating flips, optimizer, schedule, lookahead, bfloat16 where the
CPU has it) with that head added: each batch is the images upright (class and rotation-0 loss) and
each turned by a random 90/180/270 degrees (rotation loss), so a step costs twice the recipe's.

It reuses a finished run of the default recipe for its split (manifest.csv) and preprocessing, so
the validation (threshold) and test images are the same as that run's; the OOD images are a class
folder. Scores (higher: more in-distribution), each averaged over the image and its mirror:
energy, kNN similarity (k 1) on a bank of training features, the rotation score (mean log
probability of the right rotation over the four turns), Hendrycks's sum (KL of the class
probabilities from uniform plus the rotation score), and rank averages.

usage: python bench/ood_rotation.py RUN_DIR --ood OOD_FOLDER [--rotation-weight 0.5]
       [--label-smoothing 0.2] [--epochs 10] [--seed 0] [--json FILE]"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_json  # noqa: E402
from bench.calibration_ood import split_files  # noqa: E402
from bench.ood_post_hoc import rank_average, rate  # noqa: E402
from pixclass import artifact as artifact_io  # noqa: E402
from pixclass.data.loaders import epoch_order, load_split  # noqa: E402
from pixclass.data.scan import scan_class_folders  # noqa: E402
from pixclass.models.airbench import AirbenchNet  # noqa: E402
from pixclass.progress import Reporter  # noqa: E402
from pixclass.train.precision import resolve_precision  # noqa: E402
from pixclass.train.recipes.fast import (Lookahead, _crops, _param_groups, _standardize, batch_size_for,  # noqa: E402
                                         hyper_for, lr_factor, steps_per_epoch_for)

SPLITS = ("val", "test", "ood")


class RotationNet(nn.Module):
    """airbench with a second, 4-way head on the pooled features."""

    def __init__(self, net: AirbenchNet):
        super().__init__()
        self.net = net
        self.rotation_head = nn.Linear(net.head.in_features, 4, bias=False)

    def forward(self, x):  # -> class logits, rotation logits, pooled features
        net = self.net
        with torch.autocast(x.device.type, enabled=False):
            x = F.gelu(net.whiten(x.float()))
        f = net.pool(net.groups(x)).flatten(1)
        return net.head(f) * net.output_scale, self.rotation_head(f) * net.output_scale, f


def turned(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each image of x turned by k[i] quarter turns."""
    out = x.clone()
    for q in (1, 2, 3):
        at = (k == q).nonzero().flatten()
        if len(at):
            out[at] = torch.rot90(x[at], q, dims=(2, 3))
    return out


def train(model: RotationNet, images, labels, pre, args, dtype) -> float:
    hyp = replace(hyper_for("airbench"), label_smoothing=args.label_smoothing)
    n = len(labels)
    batch_size = batch_size_for(n, hyp)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model.net.init_whitening(_standardize(images[torch.randperm(n, generator=g)[:5000]], pre))
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, hyp, batch_size), momentum=hyp.momentum, nesterov=True)
    class_loss = nn.CrossEntropyLoss(label_smoothing=hyp.label_smoothing, reduction="sum")
    rotation_loss = nn.CrossEntropyLoss(reduction="sum")
    steps_per_epoch = steps_per_epoch_for(n, batch_size)
    total = steps_per_epoch * args.epochs
    lookahead = Lookahead(model)
    flip_base = torch.rand(n, generator=g) < 0.5
    step, started = 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        model.net.whiten.bias.requires_grad_(epoch < hyp.whiten_bias_epochs)
        order = epoch_order(n, True, g, None)
        flips = flip_base ^ bool(epoch % 2)
        seen, loss_sum, correct, rot_correct = 0, 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = _crops(images, idx, pre.size, hyp.translate, g)
            x = _standardize(torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x), pre)
            k = torch.randint(1, 4, (len(idx),), generator=g)
            both = torch.cat([x, turned(x, k)]).contiguous(memory_format=torch.channels_last)
            rot_target = torch.cat([torch.zeros(len(idx), dtype=torch.long), k])
            y = labels[idx]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits, rot_logits, _ = model(both)
            # per image: the class loss plus the weight times the mean rotation loss of its two views
            loss = (class_loss(logits[:len(idx)].float(), y)
                    + args.rotation_weight * rotation_loss(rot_logits.float(), rot_target) / 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % hyp.lookahead_every == 0:
                lookahead.update(0.95 ** hyp.lookahead_every * (step / total) ** 3)
            seen += len(idx)
            loss_sum += loss.item()
            correct += (logits[:len(idx)].argmax(1) == y).sum().item()
            rot_correct += (rot_logits.argmax(1) == rot_target).sum().item()
        print(f"epoch {epoch + 1}: loss {loss_sum / seen:.4f} acc {correct / seen:.4f} "
              f"rotation acc {rot_correct / (2 * seen):.4f} {time.perf_counter() - started:.0f} s", flush=True)
    lookahead.update(1.0)
    model.eval()
    return time.perf_counter() - started


@torch.inference_mode()
def outputs(model: RotationNet, images: torch.Tensor, pre) -> dict[str, torch.Tensor]:
    """Class logits (2 views x N x K), features (2 x N x D) and rotation log-probabilities of the
    right answer (2 views x 4 turns x N), in float32."""
    logits, feats, rot = [], [], []
    for start in range(0, len(images), 500):
        x = _standardize(images[start:start + 500], pre)
        per_view_logits, per_view_feats, per_view_rot = [], [], []
        for v in (x, x.flip(-1)):
            z, _, f = model(v)
            per_view_logits.append(z.float())
            per_view_feats.append(f.float())
            per_turn = []
            for q in range(4):
                _, r, _ = model(torch.rot90(v, q, dims=(2, 3)).contiguous(memory_format=torch.channels_last))
                per_turn.append(F.log_softmax(r.float(), 1)[:, q])
            per_view_rot.append(torch.stack(per_turn))
        logits.append(torch.stack(per_view_logits))
        feats.append(torch.stack(per_view_feats))
        rot.append(torch.stack(per_view_rot))
    return {"logits": torch.cat(logits, 1), "features": torch.cat(feats, 1), "rotation": torch.cat(rot, 2)}


def scores_of(out: dict, temperature: float) -> dict[str, dict[str, np.ndarray]]:
    bank = F.normalize(out["train"]["features"].mean(0), dim=1)

    def per_split(fn):
        return {s: np.asarray(fn(out[s])) for s in SPLITS}

    def kl_from_uniform(z):
        logp = F.log_softmax(z / temperature, 2)
        return (-math.log(z.shape[2]) - logp.mean(2)).mean(0)

    scores = {"energy": per_split(lambda o: torch.logsumexp(o["logits"] / temperature, 2).mean(0)),
              "max logit": per_split(lambda o: o["logits"].mean(0).max(1).values),
              "kNN, k 1": per_split(lambda o: (F.normalize(o["features"].mean(0), dim=1) @ bank.T).max(1).values),
              "rotation": per_split(lambda o: o["rotation"].mean((0, 1))),
              "KL from uniform + rotation": per_split(lambda o: kl_from_uniform(o["logits"]) + o["rotation"].mean((0, 1)))}
    for a, b in (("energy", "rotation"), ("kNN, k 1", "rotation"), ("energy", "kNN, k 1")):
        scores[f"rank average: {a} + {b}"] = rank_average(scores[a], scores[b])
    return scores


def fitted_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimizing the validation NLL of the view-averaged probabilities (a grid)."""
    grid = np.exp(np.linspace(np.log(0.2), np.log(5), 61))
    nll = [F.nll_loss(torch.log(F.softmax(logits / t, 2).mean(0) + 1e-12), labels).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run of the default recipe: its split and preprocessing")
    parser.add_argument("--ood", type=Path, required=True)
    parser.add_argument("--rotation-weight", type=float, default=0.5)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    art = artifact_io.load(args.run / "model")
    pre = art.preprocess
    quiet = Reporter(quiet=True)
    data = {}
    for name in ("train", "val", "test"):
        split, _ = load_split(*split_files(args.run, art, name), pre, quiet, max_memory_gb=8)
        data[name] = split
    ood_paths = sorted(p for files in scan_class_folders(args.ood, []).values() for p in files)
    data["ood"], _ = load_split(ood_paths, [0] * len(ood_paths), pre, quiet, max_memory_gb=8)
    model = RotationNet(AirbenchNet(len(art.classes), widths=(64, 256, 256)))
    dtype = resolve_precision("auto")
    train_s = train(model, data["train"].images, data["train"].labels, pre, args, dtype)
    keep = np.sort(np.random.default_rng(1).choice(len(data["train"]), min(args.train_limit, len(data["train"])),
                                                   replace=False))
    out = {name: outputs(model, data[name].images, pre) for name in SPLITS}
    out["train"] = outputs(model, data["train"].images[torch.from_numpy(keep)], pre)
    temperature = fitted_temperature(out["val"]["logits"], data["val"].labels)
    accuracy = float((out["test"]["logits"].mean(0).argmax(1) == data["test"].labels).float().mean())
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("run", "ood", "json")},
              "train_s": round(train_s, 1), "test_accuracy": round(accuracy, 4), "temperature": round(temperature, 3),
              "scores": {name: rate(s) for name, s in scores_of(out, temperature).items()}}
    print_json(result, args.json)


if __name__ == "__main__":
    main()
