"""The one-liner layer: `ImageFolder`, `ImageClassifier`, `load`, in the shape users know from
Keras and fastai. `ImageClassifier().fit(ImageFolder(path))` runs the very pipeline `pixclass train
path` runs (same recipe, same defaults, same run folder); everything else is a thin composition of
the modules below. Training code is imported only when `fit` is called, so loading and predicting
stay light."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import artifact as artifact_io
from .config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from .data.transforms import Preprocess
from .errors import UserError
from .models.registry import create_model
from .progress import Reporter


class ImageFolder:
    """A class-folder dataset and how to read it (split, size, channels, augmentation). `.classes`
    comes from a scan; `.train`, `.val`, `.test` are decoded on first use, with preprocessing
    chosen from the data (a pretrained model trained by `fit` uses its own, as `pixclass train` does)."""

    def __init__(self, path, image_size: int | None = None, channels: int = 3, augment="standard",
                 split=(0.7, 0.15, 0.15), seed: int = 0, manifest=None, quiet: bool = False):
        self.path, self.seed, self.manifest = str(path), seed, str(manifest) if manifest else None
        self.augment = augment if isinstance(augment, AugmentConfig) else AugmentConfig(policy=augment)
        self.data_config = DataConfig(path=self.path, image_size=image_size, channels=channels, split=split,
                                      manifest=self.manifest)
        self.reporter = Reporter(quiet)
        self._scanned, self._data = None, None

    def _scan(self):
        if self._scanned is None:
            from .data.scan import scan_dataset
            self._scanned = scan_dataset(self.path, self.data_config.split, self.seed, self.manifest)
        return self._scanned

    @property
    def classes(self) -> list[str]:
        return self._scan().classes

    def _prepared(self):
        if self._data is None:
            from .data.dataset import prepare_data
            c = self.data_config
            self._data = prepare_data(self.path, c.channels, c.image_size, c.split, self.seed, self.manifest,
                                      reporter=self.reporter)
        return self._data

    @property
    def preprocess(self) -> Preprocess:
        return self._prepared().preprocess

    @property
    def train(self):
        return self._prepared().train

    @property
    def val(self):
        return self._prepared().val

    @property
    def test(self):
        return self._prepared().test

    def counts(self) -> dict:
        return self._prepared().counts()

    def files(self, split: str) -> tuple[list[Path], list[int]]:
        """(paths, class indices) of one split ("train", "val" or "test"), not decoded."""
        scanned = self._scan()
        index = {c: i for i, c in enumerate(scanned.classes)}
        samples = scanned.split(split)
        return [s.path for s in samples], [index[s.label] for s in samples]


class ImageClassifier:
    """A model plus everything needed to use it: classes and preprocessing. `model="auto"` is what
    `pixclass train` trains by default."""

    def __init__(self, model: str = "auto", classes: list[str] | None = None, image_size: int | None = None,
                 channels: int = 3, preprocess: Preprocess | None = None, **model_options):
        self.model_name, self.classes = model, list(classes) if classes else None
        self.model_cfg = ModelConfig(name=model, **model_options)
        self.preprocess = preprocess or (Preprocess(image_size, channels, (0.5,) * channels, (0.5,) * channels)
                                         if image_size else None)
        self.model, self.arch, self.history, self.metrics, self.run_dir = None, None, [], {}, None
        self.tta = "none"  # the test-time augmentation of a loaded or trained model (tta.py)
        self.temperature, self.abstain = 1.0, None  # its calibration and abstain threshold (calibration.py, abstain.py)
        self.feature_bank = None  # the training features a knn_similarity threshold compares with (feature_bank.py)
        self.thresholds = None  # a multi-label model's per-label thresholds (None: single-label)

    # how a trained model answers, beyond its weights: carried from an artifact and back into one
    _ANSWERING = ("tta", "temperature", "abstain", "feature_bank", "thresholds")

    def _take_answering(self, art: artifact_io.Artifact) -> None:
        for name in self._ANSWERING:
            setattr(self, name, getattr(art, name))

    @classmethod
    def from_artifact(cls, art: artifact_io.Artifact) -> "ImageClassifier":
        clf = cls(art.arch["name"], art.classes, preprocess=art.preprocess)
        clf.model, clf.arch, clf.metrics = art.model, art.arch, art.metrics
        clf._take_answering(art)
        return clf

    def _build(self) -> None:
        if self.model is None:
            if self.classes is None or self.preprocess is None:
                raise UserError("the model needs classes and an image size: pass them, or call fit(data) first")
            self.model, self.arch = create_model(self.model_name, len(self.classes), self.preprocess.channels,
                                                 self.preprocess.size, self.model_cfg)

    def fit(self, data: ImageFolder, epochs: int | None = None, out=None, quiet: bool = False,
            **train_options) -> list[dict]:
        """Train a new model on `data` exactly as `pixclass train` does (the model's recipe, its
        defaults, a run folder with checkpoints, evaluation and report: `out`, default runs/<name>).
        `train_options` are TrainConfig fields (recipe, batch_size, lr, optimizer, early_stopping,
        seed...; seed defaults to the ImageFolder's). Returns the per-epoch history."""
        from .train.run import run_training
        train_options.setdefault("seed", data.seed)
        cfg = RunConfig(data=data.data_config, augment=data.augment, model=self.model_cfg,
                        train=TrainConfig(epochs=epochs, **train_options))
        summary = run_training(cfg, out=Path(out) if out else None, reporter=Reporter(quiet))
        art = artifact_io.load(summary["model_dir"])
        self.model, self.arch, self.classes, self.preprocess = art.model, art.arch, art.classes, art.preprocess
        self.model_name, self.metrics, self.run_dir = art.arch["name"], art.metrics, Path(summary["run_dir"])
        self._take_answering(art)
        self.history = summary["history"]
        return self.history

    def _artifact(self) -> artifact_io.Artifact:
        self._build()
        return artifact_io.Artifact(self.model, self.arch, self.classes, self.preprocess, metrics=self.metrics,
                                    **{name: getattr(self, name) for name in self._ANSWERING})

    def evaluate(self, data) -> dict:
        """Metrics on an ImageFolder's held-out split (test, else val), on a labelled folder, or on
        a split decoded with this model's preprocessing."""
        from .evaluate import evaluate_folder, evaluate_split
        if isinstance(data, (str, Path)):
            return evaluate_folder(self._artifact(), data)[0]
        if isinstance(data, ImageFolder):
            from .data.loaders import load_split
            paths, labels = data.files("test")
            if not paths:
                paths, labels = data.files("val")
            data, _ = load_split(paths, labels, self.preprocess, data.reporter, what="loading held-out images")
        metrics, _ = evaluate_split(self._artifact(), data)
        return metrics

    def predict_proba(self, images) -> np.ndarray:
        """Paths, bytes or PIL images -> probabilities N x classes."""
        from .predict import Predictor
        return Predictor(self._artifact()).probabilities(images if isinstance(images, (list, tuple)) else [images])

    def predict(self, images, k: int = 3):
        """Top-k classes with probabilities: one list for one image, a list of lists for several. A
        multi-label model answers every label at or above its threshold instead (likeliest first,
        possibly none), in the same form."""
        from .predict import labels_above, top_k
        single = not isinstance(images, (list, tuple))
        probs = self.predict_proba(images)
        if self.thresholds is not None:
            out = [labels_above(row, self.classes, self.thresholds) for row in probs]
        else:
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
