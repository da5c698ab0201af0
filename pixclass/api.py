"""The one-liner layer: `ImageFolder`, `ImageClassifier`, `load`, in the shape users know from
Keras and fastai. Everything here is a thin composition of the modules below it; training code is
imported only when `fit` is called, so loading and predicting stay light."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import artifact as artifact_io
from .config import AugmentConfig, ModelConfig, TrainConfig
from .data.dataset import prepare_data
from .data.transforms import Preprocess
from .errors import UserError
from .models.factory import create_model
from .progress import Reporter


class ImageFolder:
    """A class-folder dataset, split and decoded: `.classes`, `.train`, `.val`, `.test`."""

    def __init__(self, path, image_size: int | None = None, channels: int = 3, augment="standard",
                 split=(0.7, 0.15, 0.15), seed: int = 0, manifest=None, quiet: bool = False):
        self.path = str(path)
        self.augment = augment if isinstance(augment, AugmentConfig) else AugmentConfig(policy=augment)
        self.reporter = Reporter(quiet)
        self._data = prepare_data(path, channels, image_size, split, seed, manifest, reporter=self.reporter)
        self.classes, self.preprocess = self._data.classes, self._data.preprocess
        self.train, self.val, self.test = self._data.train, self._data.val, self._data.test

    def counts(self) -> dict:
        return self._data.counts()


class ImageClassifier:
    """A model plus everything needed to use it: classes and preprocessing."""

    def __init__(self, model: str = "seed-cnn", classes: list[str] | None = None, image_size: int | None = None,
                 channels: int = 3, preprocess: Preprocess | None = None, **model_options):
        self.model_name, self.classes = model, list(classes) if classes else None
        self.model_cfg = ModelConfig(name=model, **model_options)
        self.preprocess = preprocess or (Preprocess(image_size, channels, (0.5,) * channels, (0.5,) * channels)
                                         if image_size else None)
        self.model, self.arch, self.history = None, None, []

    @classmethod
    def from_artifact(cls, art: artifact_io.Artifact) -> "ImageClassifier":
        clf = cls(art.arch["name"], art.classes, preprocess=art.preprocess)
        clf.model, clf.arch, clf.metrics = art.model, art.arch, art.metrics
        return clf

    def _build(self) -> None:
        if self.model is None:
            if self.classes is None or self.preprocess is None:
                raise UserError("the model needs classes and an image size: pass them, or call fit(data) first")
            self.model, self.arch = create_model(self.model_name, len(self.classes), self.preprocess.channels,
                                                 self.preprocess.size, self.model_cfg)

    def fit(self, data: ImageFolder, epochs: int = 10, out=None, quiet: bool = False, **train_options) -> list[dict]:
        """Train on `data.train`, validating on `data.val`. `train_options` are TrainConfig fields
        (batch_size, lr, optimizer, schedule, early_stopping, seed...)."""
        import torch

        from .data.transforms import build_augment
        from .train.loop import ImageInputs, Trainer

        cfg = TrainConfig(epochs=epochs, **train_options)
        if self.model is None:
            self.classes, self.preprocess = data.classes, data.preprocess
            torch.manual_seed(cfg.seed)
            self._build()
        elif list(data.classes) != list(self.classes):
            raise UserError(f"data classes {data.classes} differ from the model's {self.classes}")
        trainer = Trainer(self.model, data.train, data.val, cfg, ImageInputs(self.preprocess, build_augment(data.augment)),
                          Path(out) if out else None, Reporter(quiet))
        self.history = trainer.fit()
        trainer.restore_best()
        self.model.eval()
        return self.history

    def _artifact(self) -> artifact_io.Artifact:
        self._build()
        return artifact_io.Artifact(self.model, self.arch, self.classes, self.preprocess,
                                    metrics=getattr(self, "metrics", {}))

    def evaluate(self, data) -> dict:
        """Metrics on a split (e.g. `data.test`) or on a labelled folder."""
        from .evaluate import evaluate_folder, evaluate_split
        if isinstance(data, (str, Path)):
            return evaluate_folder(self._artifact(), data)[0]
        metrics, _ = evaluate_split(self._artifact(), data)
        return metrics

    def predict_proba(self, images) -> np.ndarray:
        """Paths, bytes or PIL images -> probabilities N x classes."""
        from .predict import Predictor
        return Predictor(self._artifact()).probabilities(images if isinstance(images, (list, tuple)) else [images])

    def predict(self, images, k: int = 3):
        """Top-k classes with probabilities: one list for one image, a list of lists for several."""
        from .predict import top_k
        single = not isinstance(images, (list, tuple))
        probs = self.predict_proba(images)
        out = [top_k(row, self.classes, min(k, len(self.classes))) for row in probs]
        return out[0] if single else out

    def explain(self, image, method: str = "gradcam", class_name: str | None = None, layer: str | None = None):
        """Heatmap of where the model looks for one image: {"heatmap": H x W array in [0, 1],
        "probabilities": {class: p}, "figure": matplotlib Figure (original | overlay)}."""
        from .explain import Explainer, explanation_figure
        index = self.classes.index(class_name) if class_name is not None else None
        with Explainer(self._artifact(), method, layer) as explainer:
            maps, probs, batch = explainer.heatmaps([image], index)
        return {"heatmap": maps[0], "probabilities": dict(zip(self.classes, probs[0].tolist())),
                "figure": explanation_figure(batch[0], maps[0], probs[0], self.classes, method=method)}

    def filters(self, layer: str | None = None):
        """(first-layer filters as an array F x kh x kw x C in [0, 1], a Figure of the grid)."""
        from .explain import filter_grid
        self._build()
        return filter_grid(self.model, layer)

    def summary(self, depth: int = 3) -> str:
        from .models.summary import model_summary
        self._build()
        text = model_summary(self.model, self.preprocess.channels, self.preprocess.size, depth)
        print(text)
        return text

    def save(self, folder) -> Path:
        return artifact_io.save(self._artifact(), folder)


def load(folder) -> ImageClassifier:
    """Load a saved model folder (model.safetensors + pixclass.json)."""
    return ImageClassifier.from_artifact(artifact_io.load(folder))
