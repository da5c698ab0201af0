"""Linear probe: logistic regression on the pooled features of the frozen, offline ImageNet
EfficientNet-Lite0, fitted on train/ and scored on the held-out split (val/, else test/).

The baseline a fine-tuned model has to beat: nothing in the backbone adapts to the data. It is
built from pixclass's own pieces (the backbone and its packaged weights, the preprocessing those
weights expect, the decoder and the metrics), so its features are the ones pixclass's transfer
recipe starts from and its macro-F1 is computed the way `pixclass train` computes it. Features
are taken without augmentation and the fit (lbfgs) is deterministic: there is no seed to vary.
Prints one JSON document on stdout. usage: python bench/linear_probe.py ROOT [--batch-size 32]"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pixclass.data.loaders import DecodeAhead
from pixclass.data.scan import scan_dataset
from pixclass.data.transforms import Preprocess, batch_to_input
from pixclass.metrics import classification_metrics
from pixclass.models.pretrained import load_backbone, pretrained_preprocess, timm_name
from pixclass.models.transfer import TransferModel

MODEL = "efficientnet_lite0"


def frozen_backbone(num_classes: int) -> tuple[TransferModel, Preprocess]:
    """pixclass's transfer model with its ImageNet backbone loaded; only the backbone is used."""
    model = TransferModel(timm_name(MODEL), num_classes)
    load_backbone(model.backbone, MODEL)
    # channels_last like the inputs batch_to_input makes: PyTorch's CPU convolutions are fastest in it
    return model.eval().to(memory_format=torch.channels_last), pretrained_preprocess(model.backbone)


@torch.inference_mode()
def pooled_features(model: TransferModel, pre: Preprocess, paths: list[Path],
                    batch_size: int) -> tuple[np.ndarray, list[int]]:
    """N x num_features pooled backbone features and the indices of the files that decoded.
    Streams the files (CIFAR-10's 60k images at 224 px would not fit in memory as pixels)."""
    features, kept = [], []
    for chunk in DecodeAhead(paths, pre, batch_size=batch_size):
        good = [(i, img) for i, img, _ in chunk if img is not None]
        if not good:
            continue
        x = batch_to_input(torch.stack([img for _, img in good]), pre)
        features.append(model.pooled(model.backbone.forward_features(x)).numpy())
        kept += [i for i, _ in good]
    return np.concatenate(features), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder with train/ and val/ (or test/) class folders")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scanned = scan_dataset(args.root)
    held_out = "val" if scanned.split("val") else "test"
    splits = {name: scanned.split(name) for name in ("train", held_out)}
    model, pre = frozen_backbone(len(scanned.classes))
    start = time.perf_counter()
    data = {}
    for name, samples in splits.items():
        x, kept = pooled_features(model, pre, [s.path for s in samples], args.batch_size)
        data[name] = (x, np.array([scanned.classes.index(samples[i].label) for i in kept]))
    features_s = time.perf_counter() - start

    start = time.perf_counter()
    # standardized features: lbfgs converges in far fewer iterations than on the raw activations
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(*data["train"])
    fit_s = time.perf_counter() - start
    x_held, y_held = data[held_out]
    metrics = classification_metrics(y_held, probe.predict_proba(x_held), scanned.classes)
    print(json.dumps({"split": held_out, "n": len(y_held), "n_train": len(data["train"][1]),
                      "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                      "features_s": round(features_s, 2), "fit_s": round(fit_s, 2),
                      "skipped_files": sum(len(s) for s in splits.values()) - len(y_held) - len(data["train"][1])}))


if __name__ == "__main__":
    main()
