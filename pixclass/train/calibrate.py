"""The end of every training run, whatever the recipe: the calibration temperature and the
abstain threshold, both fitted on the validation split with the final network as the artifact
will run it (its test-time augmentation included), and the held-out split's probabilities as the
calibrated artifact gives them.

The abstain threshold is a knn_similarity one (abstain.py, feature_bank.py): the bank holds the
penultimate features of a seeded sample of the training images, and the threshold keeps 95% of
the validation images' similarities to it; a max_probability threshold fitted alongside is its
fallback for the exports that answer probabilities only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..abstain import Abstain, fit_abstain
from ..calibration import fit_temperature
from ..data.dataset import PathSplit
from ..data.loaders import SplitData, load_split
from ..feature_bank import (bank_indices, bank_of, classifier_layer, features_of_batches,
                            nearest_similarity_in_chunks)
from ..heap import return_freed_memory
from ..progress import Reporter
from ..tta import combine_views


@dataclass
class Calibrated:
    temperature: float
    abstain: Abstain | None
    held_out: np.ndarray | None  # the held-out split's probabilities at `temperature`, in its order
    feature_bank: torch.Tensor | None = None  # knn_similarity's bank (None: a max_probability threshold)
    held_out_similarity: np.ndarray | None = None  # the held-out split's similarities to the bank


class CachedScores(Protocol):
    """What a recipe that keeps its inputs cached (transfer learning's features) can give in place
    of running the final network on images: the same logits and normalized penultimate features,
    from the cache through the trained part alone."""

    def split(self, name: str, tta: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(logits V x N x K, features V x N x D, labels N) of split `name` ("val", "test") on
        the views `tta` names."""

    def bank(self, seed: int) -> torch.Tensor | None:
        """Features 1 x M x D of the training images feature_bank would sample (None: none)."""


def images_per_batch(size: int, most: int = 128) -> int:
    """How many images of `size` pixels a side go through the network at once here: a pixel budget,
    not a fixed count, since a backbone's activations at 224 px take ~50x those at 32 px. Large
    batches buy nothing on a CPU: at 224 px a batch of 128 held gigabytes on top of the run and
    ran slower than one of 4 (bench/RESULTS.md)."""
    return max(4, min(most, (1 << 18) // (size * size)))


def calibrate(model, data, tta: str, held_split: str | None, reporter: Reporter, max_memory_gb: float,
              batch_size: int | None = None, seed: int = 0, cached: CachedScores | None = None) -> Calibrated | None:
    """None without a validation split (the model stays uncalibrated and never answers unknown).
    `batch_size`: by default images_per_batch of the preprocessing size. `cached`: the recipe's
    scores from its cache, used instead of running the network on the images."""
    batch_size = batch_size or images_per_batch(data.preprocess.size)
    return_freed_memory()  # what training freed, before the network runs on every split again
    if data.val is None or len(data.val) == 0:
        reporter.warn("no validation split: the probabilities stay uncalibrated and the model never answers "
                      "unknown (both are fitted on validation images; --split 0.8,0.2,0 keeps some)")
        return None

    def scored(name: str):  # (logits V x N x K, normalized features V x N x D, labels N)
        if cached is not None:
            return cached.split(name, tta)
        split = getattr(data, name)
        if isinstance(split, PathSplit):  # a recipe that did not decode it (cached features)
            split, _ = load_split(split.paths, split.labels, data.preprocess, Reporter(quiet=True), max_memory_gb)
        return features_of_batches(model, data.preprocess, split.batches(batch_size), tta)

    val_logits, val_features, val_labels = scored("val")
    temperature = fit_temperature(val_logits, val_labels)
    val_probs = combine_views(val_logits, temperature).numpy()
    abstain = fit_abstain(val_probs)
    if cached is not None:
        bank_features = cached.bank(seed)
        bank = bank_of(bank_features) if bank_features is not None else None
    else:
        bank = feature_bank(model, data.train, data.preprocess, max_memory_gb, batch_size, seed)
    if bank is not None:
        abstain = fit_abstain(val_probs, method="knn_similarity", fallback=abstain,
                              similarity=nearest_similarity_in_chunks(val_features, bank.float()).numpy())
    held_out = held_similarity = None
    if held_split == "val":
        held_out, held_features = val_probs, val_features
    elif held_split is not None:
        held_logits, held_features, _ = scored(held_split)
        held_out = combine_views(held_logits, temperature).numpy()
    if held_split is not None and bank is not None:
        held_similarity = nearest_similarity_in_chunks(held_features, bank.float()).numpy()
    reporter.info(f"calibration: temperature {temperature:.3f}; unknown below {abstain.method.replace('_', ' ')} "
                  f"{abstain.threshold:.3f} (keeps {abstain.keep:.0%} of the validation images"
                  + (f"; bank of {len(bank)} training images)" if bank is not None else ")"))
    return Calibrated(temperature, abstain, held_out, bank, held_similarity)


class ScoresOnImages:
    """CachedScores of a recipe that holds its splits decoded: the final network run on each
    split's images once and kept, so the recipe's own held-out figure and the calibration after it
    share that pass instead of each making its own (on CIFAR-10's 10,000 test images, a pass of
    two views is ~20,000 float32 forward passes)."""

    def __init__(self, model, data, max_memory_gb: float, batch_size: int | None = None):
        self.model, self.data, self.max_memory_gb = model, data, max_memory_gb
        self.batch_size = batch_size or images_per_batch(data.preprocess.size)
        self._scores = {}

    def split(self, name: str, tta: str):
        if (name, tta) not in self._scores:
            images = getattr(self.data, name)
            self._scores[name, tta] = features_of_batches(self.model, self.data.preprocess,
                                                          images.batches(self.batch_size), tta)
        return self._scores[name, tta]

    def bank(self, seed: int):
        return bank_features(self.model, self.data.train, self.data.preprocess, self.max_memory_gb,
                             self.batch_size, seed)


def feature_bank(model, train, preprocess, max_memory_gb: float, batch_size: int = 128, seed: int = 0):
    """knn_similarity's bank: the normalized penultimate features (float16) of a seeded sample of
    the training images, each as it is (no augmentation, no test-time views); None for a network
    without a classifier layer to read them at."""
    features = bank_features(model, train, preprocess, max_memory_gb, batch_size, seed)
    return bank_of(features) if features is not None else None


def bank_features(model, train, preprocess, max_memory_gb: float, batch_size: int = 128, seed: int = 0):
    """The bank's training images' features, 1 x M x D float32 (None: no classifier layer)."""
    try:
        classifier_layer(model)
    except ValueError:
        return None
    keep = bank_indices(len(train), seed=seed)
    if isinstance(train, SplitData):
        sample = SplitData(train.images[keep], train.labels[keep], [train.paths[i] for i in keep])
    else:  # streamed or not decoded: decode the sample only
        sample, _ = load_split([train.paths[i] for i in keep], [int(train.labels[i]) for i in keep], preprocess,
                               Reporter(quiet=True), max_memory_gb)
    _, features, _ = features_of_batches(model, preprocess, sample.batches(batch_size))
    return features
