"""What a pixclass.json may hold, checked before anything is built from it.

A model folder is input like any other: copied from elsewhere, hand-edited, damaged. Everything in
the file is checked here, as pydantic models: types (strict, so no string or bool passes for a
number), ranges (an image size the decoder and the network can handle), the arch's keyword
arguments against the list its model family declares (so no key reaches timm that makes it open a
file), and the fields against each other: one class name per network output, the channels and the
image size the network was built for. Each problem becomes one UserError line naming the file and
the field. Whether the weights fit the network is the loader's check (artifact.py), on the meta
device, before any real tensor is allocated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator,
                      model_validator)

from .errors import UserError, first_line
from .models.registry import MAX_CLASSES, ArchKwargs, ImageSize, ModelFamily, family_of
from .abstain import METHODS as ABSTAIN_METHODS
from .calibration import TEMPERATURE_RANGE
from .tta import TTA_MODES

FORMAT = "pixclass-artifact/1"
# the JSON a run writes is a few kB (most of it the training config); far beyond that is not one
MAX_METADATA_BYTES = 16 * 2**20

# a model name as pixclass and timm write them: no ":" (timm reads "hf-hub:..." and "local-dir:..."
# as places to load a configuration from), no "/" (no path)
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=128)]


def _class_name(value: Any) -> str:
    # by hand, not pydantic's str: that refuses a lone surrogate, which is how a class folder's
    # name that is not valid UTF-8 comes back from the JSON
    if not isinstance(value, str) or not 1 <= len(value) <= 1000:
        raise ValueError("a class name is a string of 1 to 1000 characters")
    return value


ClassName = Annotated[str, PlainValidator(_class_name)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PreprocessSpec(_Strict):
    """data.transforms.Preprocess, with its defaults."""

    size: ImageSize
    channels: Literal[1, 3] = 3
    mean: Annotated[list[FiniteFloat], Field(min_length=1, max_length=3)] = [0.5, 0.5, 0.5]
    std: Annotated[list[Annotated[FiniteFloat, Field(gt=0)]], Field(min_length=1, max_length=3)] = [0.5, 0.5, 0.5]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    resize: Literal["squash", "crop"] = "squash"
    crop_pct: Annotated[FiniteFloat, Field(gt=0.05, le=1)] = 1.0

    @model_validator(mode="after")
    def _one_value_per_channel(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each (channels is {self.channels})")
        return self


class ArchSpec(_Strict):
    name: ModelName
    # only pretrained-backbone networks have one; `null` is not "absent" (the family is chosen by
    # the key's presence), so an explicit null fails as a non-string
    backbone: ModelName = Field(default=None)
    kwargs: dict[str, Any]


class AbstainSpec(_Strict):
    """abstain.Abstain: below `threshold` of its score an image is answered `unknown`."""

    method: Literal[ABSTAIN_METHODS]
    threshold: FiniteFloat
    keep: Annotated[FiniteFloat, Field(gt=0, le=1)]
    # knn_similarity's threshold for readers of the probabilities alone (absent: they never abstain)
    fallback: "AbstainSpec | None" = None

    @model_validator(mode="after")
    def _fallback_reads_probabilities(self):
        if self.fallback is not None and self.fallback.method != "max_probability":
            raise ValueError("a fallback threshold is a max_probability one")
        return self


class ArtifactSpec(_Strict):
    # other top-level keys are ignored rather than refused: nothing reads them, and a later
    # version may add some
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    format: Literal[FORMAT]
    arch: ArchSpec
    classes: Annotated[list[ClassName], Field(min_length=1, max_length=MAX_CLASSES)]
    preprocess: PreprocessSpec
    # absent in the artifacts written before test-time augmentation existed: they mean "none"
    tta: Literal[TTA_MODES] = "none"
    # absent in the artifacts written before calibration existed: they mean 1 (the raw softmax)
    temperature: Annotated[FiniteFloat, Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])] = 1.0
    # absent or null: the model never answers "unknown" (older artifacts, runs without a validation split)
    abstain: AbstainSpec | None = None
    # absent in the artifacts written before multi-label models existed: they are single-label
    task: Literal["multiclass", "multilabel"] = "multiclass"
    # a multi-label model's decision threshold per class (null for a single-label one)
    thresholds: list[Annotated[FiniteFloat, Field(ge=0, le=1)]] | None = None
    config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    versions: dict[str, Any] = {}

    @field_validator("config")
    @classmethod
    def _data_path_is_text(cls, config: dict) -> dict:
        # the training config is free-form, except what export reads from it: config.data.path, the
        # held-out images it verifies on when no --data is given
        data = config.get("data", {})
        if not isinstance(data, dict) or not isinstance(data.get("path", ""), (str, type(None))):
            raise ValueError("config.data must be an object whose path is a string")
        return config

    @model_validator(mode="after")
    def _one_threshold_per_class(self):
        if self.task == "multilabel" and (self.thresholds is None or len(self.thresholds) != len(self.classes)):
            raise ValueError(f"thresholds: a multilabel model needs one per class ({len(self.classes)})")
        if self.task == "multiclass" and self.thresholds is not None:
            raise ValueError("thresholds: only a multilabel model has them")
        return self

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str]) -> list[str]:
        seen = set()
        for name in classes:
            if name in seen:
                raise ValueError(f"class {name!r} is listed twice")
            seen.add(name)
        return classes


@dataclass(frozen=True)
class Metadata:
    """A checked pixclass.json: `arch` holds only what the file gave (validated), for the family's
    builder; `kwargs` is the same with the family's defaults filled in."""

    spec: ArtifactSpec
    arch: dict
    family: ModelFamily
    kwargs: ArchKwargs


def read_metadata(path: Path) -> Metadata:
    """The checked contents of the pixclass.json at `path`, or a UserError naming what is wrong."""
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise UserError(f"{path}: {size} bytes, too large for a model description "
                        f"(at most {MAX_METADATA_BYTES // 2**20} MiB)")
    # Python's parser, not pydantic's: it reads back everything `json.dumps` writes, such as a class
    # folder's name that is not valid UTF-8 (a lone surrogate escape), which pydantic's refuses
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from None
    try:
        spec = ArtifactSpec.model_validate(document)
    except ValidationError as e:
        raise UserError(f"{path}: {describe(e)}") from None
    arch = spec.arch.model_dump(exclude_unset=True)
    family = family_of(arch)
    try:
        kwargs = family.arch_kwargs.model_validate(arch["kwargs"])
    except ValidationError as e:
        raise UserError(f"{path}: {describe(e, prefix=('arch', 'kwargs'), known=family.arch_kwargs)}") from None
    arch["kwargs"] = kwargs.model_dump(exclude_unset=True)
    _check_agreement(path, spec, family, kwargs)
    return Metadata(spec=spec, arch=arch, family=family, kwargs=kwargs)


def _check_agreement(path: Path, spec: ArtifactSpec, family: ModelFamily, kwargs: ArchKwargs) -> None:
    """The fields that describe the same network agree with each other."""
    pre = spec.preprocess
    if len(spec.classes) != kwargs.num_classes:
        raise UserError(f"{path}: classes: {len(spec.classes)} names for a network with {kwargs.num_classes} "
                        f"outputs (arch.kwargs.num_classes)")
    if pre.channels != kwargs.in_channels:
        raise UserError(f"{path}: preprocess.channels: {pre.channels}, but the network takes {kwargs.in_channels} "
                        f"(arch.kwargs.in_channels)")
    built_for = family.input_size(kwargs)
    if built_for is not None and pre.size != built_for:
        raise UserError(f"{path}: preprocess.size: {pre.size}, but the network was built for "
                        f"{built_for}x{built_for} images (arch.kwargs.image_size)")


def describe(error: ValidationError, prefix: tuple = (), known: type[BaseModel] | None = None) -> str:
    """The first problem pydantic found, as 'field.path: what is wrong (got VALUE)', plus how many
    more there are."""
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in (*prefix, *first["loc"]))
    kind, value = first["type"], first.get("input")
    if kind == "model_type" and not loc:
        message = f"must hold a JSON object (got {_short_json(value)})"
    elif kind == "extra_forbidden":
        message = f"not a known argument (known: {', '.join(known.model_fields)})" if known else "not a known field"
    else:
        message = first["msg"]
        if kind != "missing" and (value is None or isinstance(value, (bool, int, float, str))):
            message += f" (got {_short_json(value)})"
    more = error.error_count() - 1
    where = f"{loc}: " if loc else ""
    return f"{where}{message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _short_json(value: Any, limit: int = 60) -> str:
    """`value` as JSON on one line, cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
