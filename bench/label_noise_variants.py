"""Which frozen features give `audit --labels` better out-of-fold probabilities (issue 19, acceptance 1).

Same noisy CIFAR-10 copy as bench/label_noise.py (seeded flips into another random class). Each
offline ImageNet backbone (EfficientNet-Lite0/1/2 at its own input size) runs once over the
images; pooled outputs of its last two blocks and of its final conv are kept. Every feature set,
and the concatenation and the probability average across backbones, goes through the audit's own
heads (label_issues.out_of_fold_probabilities: 5-fold logistic regression, C by out-of-fold
log-loss) and cleanlab's ranking; printed: out-of-fold accuracy and how many of the flipped files
are among as many top suggestions as there are flipped files. One JSON document.

usage: python bench/label_noise_variants.py CIFAR_TRAIN_DIR [--per-class 200] [--backbones efficientnet_lite0,efficientnet_lite2]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.label_noise import build_noisy_copy  # noqa: E402
from pixclass.data.transforms import batch_to_input, image_to_uint8  # noqa: E402
from pixclass.label_issues import out_of_fold_probabilities  # noqa: E402
from pixclass.models.pretrained import imagenet_model, pretrained_preprocess  # noqa: E402


@torch.inference_mode()
def pooled_layers(name: str, paths: list[Path], batch: int = 50) -> dict[str, np.ndarray]:
    """{"block5", "block6", "head"}: N x channels, global-average pooled, of one backbone."""
    model = imagenet_model(name)
    pre = pretrained_preprocess(model)
    out: dict[str, list] = {"block5": [], "block6": [], "head": []}
    for start in range(0, len(paths), batch):
        images = torch.stack([image_to_uint8(Image.open(p).convert("RGB"), pre) for p in paths[start:start + batch]])
        x = model.bn1(model.conv_stem(batch_to_input(images, pre).float()))
        for i, block in enumerate(model.blocks):
            x = block(x)
            if i == len(model.blocks) - 2:
                out["block5"].append(x.mean((2, 3)).numpy())
        out["block6"].append(x.mean((2, 3)).numpy())
        out["head"].append(model.bn2(model.conv_head(x)).mean((2, 3)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def hits(probs: np.ndarray, labels: np.ndarray, flipped: np.ndarray) -> dict:
    from cleanlab.filter import find_label_issues
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return {"accuracy": round(float((probs.argmax(1) == labels).mean()), 4), "suggestions": len(ranked),
            "hits": int(flipped[ranked[:int(flipped.sum())]].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "noisy"
        wrong = build_noisy_copy(args.source, data, args.per_class, args.fraction, args.seed)
        classes = sorted(d.name for d in data.iterdir())
        paths = sorted(p for c in classes for p in (data / c).iterdir())
        labels = np.array([classes.index(p.parent.name) for p in paths])
        flipped = np.array([str(p) in wrong for p in paths])
        result, heads, seconds = {}, {}, {}
        for name in args.backbones.split(","):
            started = time.perf_counter()
            layers = pooled_layers(name, paths)
            seconds[name] = round(time.perf_counter() - started, 1)
            for layer, features in layers.items():
                probs, c = out_of_fold_probabilities(features, labels, 5, args.seed)
                result[f"{name} {layer}"] = {**hits(probs, labels, flipped), "C": c}
                if layer == "head":
                    heads[name] = (features, probs)
        if len(heads) > 1:
            probs, c = out_of_fold_probabilities(np.hstack([f for f, _ in heads.values()]), labels, 5, args.seed)
            result["heads concatenated"] = {**hits(probs, labels, flipped), "C": c}
            result["heads' probabilities averaged"] = hits(np.mean([p for _, p in heads.values()], 0), labels, flipped)
    print(json.dumps({"images": len(paths), "flipped": int(flipped.sum()), "feature_seconds": seconds,
                      "variants": result}, indent=2))


if __name__ == "__main__":
    main()
