"""Frozen, validated configuration dataclasses, read from and written to YAML.

Every value is checked when the dataclass is created, so a bad value in a config file or on the
command line fails early with one line naming the field, never deep inside training."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic_write import write_text_atomically
from .errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)} (got {value!r})")


@dataclass(frozen=True)
class AugmentConfig:
    """Keras ImageDataGenerator-style augmentation (the same parameter meanings), applied to whole batches.

    rotation: degrees, uniform in [-rotation, rotation]; width_shift/height_shift: fraction of the
    image size; shear: shear factor (x' = x + s*y), 0.2 is about 11 degrees; zoom: scale factors
    uniform in [1-zoom, 1+zoom] per axis; fill: how pixels outside the image are filled
    ("nearest" repeats the border, as Keras' fill_mode='nearest'); brightness/contrast: factors
    uniform in [1-b, 1+b]."""

    policy: str = "standard"
    rotation: float = 20.0
    width_shift: float = 0.1
    height_shift: float = 0.1
    shear: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    vertical_flip: bool = False
    fill: str = "nearest"
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self):
        _check_choice("augment", self.policy, ("none", "standard"))
        _check_choice("augment.fill", self.fill, ("nearest", "constant", "reflect"))
        for name in ("rotation", "width_shift", "height_shift", "shear", "zoom", "brightness", "contrast"):
            _check(getattr(self, name) >= 0, f"augment.{name} must be >= 0")
        _check(self.zoom < 1 and self.brightness < 1 and self.contrast < 1,
               "augment.zoom, brightness and contrast must be < 1")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    image_size: int | None = None  # None: chosen from the model (pretrained) or the data
    channels: int = 3
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    manifest: str | None = None  # reuse a split manifest (CSV) from an earlier run
    # what the run may hold in memory (--max-memory; 4 fits an 8 GB laptop): decoded datasets up
    # to this size are kept in memory, and cached features up to half of it (train/memory_plan.py);
    # larger ones are read from disk batch by batch
    max_memory_gb: float = 4.0
    max_pixels: int | None = None  # larger images are rejected from their header (None: ~89 megapixels)

    def __post_init__(self):
        object.__setattr__(self, "split", tuple(float(x) for x in self.split))
        _check(self.channels in (1, 3), f"channels must be 1 or 3 (got {self.channels})")
        _check(self.image_size is None or 8 <= int(self.image_size) <= 1024,
               f"image_size must be between 8 and 1024 (got {self.image_size})")
        _check(len(self.split) == 3 and all(0 <= x < 1 or (i == 0 and x == 1) for i, x in enumerate(self.split)),
               "split must be three fractions train,val,test")
        _check(abs(sum(self.split) - 1) < 1e-6 and self.split[0] > 0,
               f"split fractions must add up to 1 with train > 0 (got {self.split})")
        _check(isinstance(self.max_memory_gb, (int, float)) and math.isfinite(self.max_memory_gb)
               and self.max_memory_gb > 0,
               f"max_memory_gb (--max-memory) must be a number of GB above 0 (got {self.max_memory_gb!r})")


DEFAULT_MODEL = "efficientnet_lite0"  # what "auto" trains on all but small images: pretrained offline, fine-tuned


@dataclass(frozen=True)
class ModelConfig:
    # "auto": DEFAULT_MODEL, or the fast recipe's own network when the recipe is (or "auto" chooses)
    # "fast"; "classic-cnn" (alias "seed-cnn"): the classic small CNN from scratch; "airbench"; or
    # any timm architecture name
    name: str = "auto"
    # classic-cnn only; ignored by other models
    filters: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = 3
    dense: int = 256
    padding: str = "valid"
    dropout: float | None = None  # None: 0 for classic-cnn, 0.2 in the head of a pretrained backbone
    # pretrained backbones: None means "yes" where offline weights ship (efficientnet_lite*)
    pretrained: bool | None = None
    weights: str | None = None  # a .safetensors / .pth state dict to start from
    hidden: int = 256  # width of the transfer head's Dense layer

    def __post_init__(self):
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        _check(len(self.filters) >= 1 and all(f > 0 for f in self.filters), "model.filters must be positive")
        _check(self.kernel_size in (1, 3, 5, 7), "model.kernel_size must be 1, 3, 5 or 7")
        _check(self.dense > 0, "model.dense must be > 0")
        _check_choice("model.padding", self.padding, ("valid", "same"))
        _check(self.dropout is None or 0 <= self.dropout < 1, f"model.dropout must be in [0, 1) (got {self.dropout})")
        _check(self.hidden > 0, "model.hidden must be > 0")


TRACKERS = ("tensorboard", "mlflow")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: 10 from scratch, 4 fine-tuning epochs for a pretrained backbone
    batch_size: int = 64
    lr: float | str = 1e-3  # "auto": the learning-rate range test chooses it (train/lr_find.py)
    optimizer: str = "adam"
    weight_decay: float = 0.0  # L2 penalty; decoupled for AdamW
    momentum: float = 0.9
    # None: the recipe's own (the fast recipe's airbench schedule 0.2, the others none)
    label_smoothing: float | None = None
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step / plateau decay factor
    plateau_patience: int = 3
    early_stopping: int = 0  # patience in epochs; 0 turns it off
    monitor: str = "val_loss"
    seed: int = 0
    threads: int | None = None
    checkpoint_interval: float = 10.0  # seconds between checkpoints (also mid-epoch); 0: after every step
    # "auto": with model "auto", chosen from the images (fast for small ones, else transfer; see
    # recipes.choose_recipe); with a model named, its family's own (transfer for pretrained
    # backbones, fast for airbench, scratch otherwise). Or "scratch", "transfer", "fast"
    recipe: str = "auto"
    # why "auto" chose the recipe and model it did (from the images' size), written into the run's
    # config.yaml for the record; empty when they were named
    recipe_reason: str = ""
    # "auto": mixed precision on GPUs (bf16 where supported, else fp16 with loss scaling); on a CPU
    # float32, except the fast recipe's bf16 where the CPU has AVX-512 BF16. Or "fp32", "bf16", "fp16"
    precision: str = "auto"
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    # minutes the run may take, from its start: the transfer recipe plans its phases to fit and
    # every phase stops at it; the fast recipe plans its epochs. None: 5 minutes for transfer
    # learning, the fast recipe's full schedule up to 15 minutes (train/budget.py)
    budget: float | None = None
    # what the transfer recipe planned for the budget and why (its choices are the fields below,
    # model.name included), written into the run's config.yaml for the record
    plan: str = ""
    # the fast recipe's optimizer steps in all when a budget cut its schedule mid-epoch (written
    # with `epochs` into config.yaml, so --config reruns the same schedule); 0: every step of `epochs`
    max_steps: int = 0
    # transfer learning (pretrained backbones)
    freeze: bool = False  # feature extractor: only the head trains, no fine-tuning phase
    head_epochs: int | None = None  # epochs of the frozen-backbone phase (cached features: milliseconds each); None: 10
    unfreeze: str = "auto"  # fine-tuning: "auto" (planned for the budget), "all", or a number of units
    feature_views: int | None = None  # augmented views per training image cached for frozen phases; None: planned
    finetune_lr: float | None = None  # head rate in fine-tuning (None: lr / 2, as fastai's fine_tune)
    lr_ratio: float = 0.1  # rate of the earliest unfrozen unit relative to the head's
    # experiment trackers the run reports to (--track): "tensorboard" (event files in the run
    # folder's tensorboard/), "mlflow" (MLFLOW_TRACKING_URI, else mlflow's local default)
    track: tuple[str, ...] = ()
    # adversarial training (--adversarial): every training batch replaced by its fast-FGSM version
    # (random start, one step of 1.25 eps) at `adversarial_eps` pixel steps of 1/255, L-infinity;
    # the report adds the held-out accuracy under PGD at that eps
    adversarial: bool = False
    adversarial_eps: float = 2.0
    # class imbalance in the training split (train/balance.py): "auto" (class-balanced loss weights
    # and checkpoints by macro-F1 from a 3:1 imbalance on), "off", "weights" or "sampler"
    balance: str = "auto"

    def __post_init__(self):
        track = (self.track,) if isinstance(self.track, str) else self.track or ()  # YAML `track: mlflow`
        object.__setattr__(self, "track", tuple(dict.fromkeys(str(t) for t in track)))
        for tracker in self.track:
            _check_choice("track", tracker, TRACKERS)
        _check(self.epochs is None or self.epochs >= 0, f"epochs must be >= 0 (got {self.epochs})")
        _check(isinstance(self.max_steps, int) and self.max_steps >= 0,
               f"max_steps must be a whole number >= 0 (got {self.max_steps!r})")
        _check(self.head_epochs is None or self.head_epochs >= 0, "head_epochs must be >= 0")
        _check(self.budget is None or 0 < self.budget <= 24 * 60,
               f"budget must be a number of minutes above 0, at most a day (got {self.budget})")
        _check(isinstance(self.plan, str), "plan must be a string")
        _check(self.unfreeze in ("auto", "all") or str(self.unfreeze).isdigit(),
               f"unfreeze must be auto, all or a number of units (got {self.unfreeze!r})")
        _check(self.feature_views is None or self.feature_views >= 0, "feature_views must be >= 0")
        _check(self.finetune_lr is None or self.finetune_lr > 0, "finetune_lr must be > 0")
        _check(0 < self.lr_ratio <= 1, "lr_ratio must be in (0, 1]")
        _check(isinstance(self.adversarial, bool), f"adversarial must be true or false (got {self.adversarial!r})")
        _check(isinstance(self.adversarial_eps, (int, float)) and 0 < self.adversarial_eps <= 64,
               f"adversarial_eps must be in (0, 64] (1/255 pixel steps; got {self.adversarial_eps!r})")
        _check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        _check(self.lr == "auto" or (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                     and math.isfinite(self.lr) and self.lr > 0),
               f"train.lr must be > 0 or auto (got {self.lr!r})")
        _check_choice("optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _check_choice("schedule", self.schedule, ("constant", "step", "cosine", "onecycle", "plateau"))
        _check_choice("monitor", self.monitor, ("val_loss", "val_accuracy"))
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.label_smoothing is None or 0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        _check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        _check(self.early_stopping >= 0, "early_stopping must be >= 0")
        _check(self.step_size >= 1 and 0 < self.gamma <= 1, "step_size must be >= 1 and gamma in (0, 1]")
        _check(self.threads is None or self.threads >= 1, "threads must be >= 1")
        _check(self.checkpoint_interval >= 0, "checkpoint_interval must be >= 0")
        _check(isinstance(self.recipe_reason, str), "recipe_reason must be a string")
        _check_choice("recipe", self.recipe, ("auto", "standard", "scratch", "transfer", "fast", "fewshot"))
        _check_choice("balance", self.balance, ("auto", "off", "weights", "sampler"))
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check(self.device in ("auto", "cpu", "mps") or self.device == "cuda" or
               (self.device.startswith("cuda:") and self.device[5:].isdigit()),
               f"device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, section: str, **changes) -> "RunConfig":
        """A copy with some fields of one section changed (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config must be a mapping of sections (data, augment, model, train)")
        sections = {f.name: f.type for f in fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        built = {}
        for f in fields(cls):
            section_cls = {"data": DataConfig, "augment": AugmentConfig, "model": ModelConfig, "train": TrainConfig}[f.name]
            values = raw.get(f.name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section {f.name!r} must be a mapping")
            known = {sf.name for sf in fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"unknown key(s) in {f.name}: {', '.join(sorted(bad))}")
            try:
                built[f.name] = section_cls(**values)
            except TypeError as e:  # wrong type compared or converted in validation
                raise ConfigError(f"bad value in {f.name}: {e}") from None
        return cls(**built)

    def save_yaml(self, path: Path) -> None:
        """Written beside and renamed over `path`: a run's config.yaml (what --resume reads) is
        never left half-written by a full disk or a kill."""
        write_text_atomically(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        return cls.from_dict(raw)


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
