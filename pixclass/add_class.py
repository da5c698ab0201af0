"""`pixclass add-class`: a new class for a few-shot model, without retraining the others.

A model the few-shot recipe fitted answers through one `NormalizedLinear` head on the backbone's
unit-norm embedding: one row per class. The new class gets one more row, the mean embedding of
its folder's images (unit norm, times the scale of the existing rows), and every existing row is
left exactly as it was, so an image of an old class keeps its scores for the old classes. A model
that answers "unknown" by its images' distance to a bank of training features (feature_bank.py)
gets the new images' embeddings added to the bank, else every image of the new class would be
answered "unknown"; the threshold stays the one fitted on the old classes. The result is written
as a new model folder; the original is not touched."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import artifact as artifact_io
from .data.scan import collect_image_paths
from .embeddings import embed_files
from .errors import UserError
from .models.registry import family_of
from .models.transfer import NormalizedLinear


def add_class(model_dir: Path, folder: Path, name: str | None = None, out: Path | None = None) -> dict:
    art = artifact_io.load(model_dir)
    head = getattr(art.model, "head", None)
    if art.arch.get("kwargs", {}).get("head") != "normalized" or not isinstance(head, NormalizedLinear):
        raise UserError(f"{model_dir} is not a few-shot (prototype) model: add-class extends the head the fewshot "
                        f"recipe fits (train with --recipe fewshot, or with at most 10 images per class)")
    name = name or Path(folder).name
    if name in art.classes:
        raise UserError(f"{model_dir} already has a class {name!r}; choose another with --name")
    if not Path(folder).is_dir():
        raise UserError(f"not a folder: {folder}")
    paths = collect_image_paths([Path(folder)])
    embedded = embed_files(art, paths)
    if not embedded.paths:
        raise UserError(f"no readable images in {folder}")
    out = Path(out) if out is not None else Path(model_dir).with_name(f"{Path(model_dir).name}-{_slug(name)}")
    if out.exists():
        raise UserError(f"{out} exists already: choose another --out (add-class never overwrites a model)")
    extended = _extended_head(head, embedded.embeddings)
    art.model.head = extended
    kwargs = {**art.arch["kwargs"], "num_classes": len(art.classes) + 1}
    metrics = {k: v for k, v in art.metrics.items() if k.startswith(("loo_", "fewshot_"))}
    metrics["added_classes"] = list(art.metrics.get("added_classes", [])) + [
        {"name": name, "images": len(embedded.paths), "from": str(folder)}]
    new = dataclasses.replace(art, arch={**art.arch, "kwargs": kwargs}, classes=art.classes + [name], metrics=metrics,
                              feature_bank=_extended_bank(art.feature_bank, embedded.embeddings))
    artifact_io.save(new, out)
    return {"model_dir": str(out), "classes": new.classes, "added": name, "images": len(embedded.paths),
            "skipped_files": [str(p) for p, _ in embedded.failures]}


def _extended_head(head: NormalizedLinear, embeddings: np.ndarray) -> NormalizedLinear:
    """The head with one more row: the new images' unit-norm mean at the mean norm (and bias) of the
    existing rows (for a prototype head, its scale and 0)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    prototype = torch.from_numpy(unit.mean(0)).float()
    prototype = prototype / prototype.norm().clamp_min(1e-12)
    weight, bias = head.weight.detach(), head.bias.detach()
    row = prototype * weight.norm(dim=1).mean()
    extended = NormalizedLinear(head.in_features, head.out_features + 1)
    with torch.no_grad():
        extended.weight.copy_(torch.cat([weight, row[None]]))
        extended.bias.copy_(torch.cat([bias, bias.mean()[None]]))
    return extended


def _extended_bank(bank: torch.Tensor | None, embeddings: np.ndarray) -> torch.Tensor | None:
    """The feature bank with the new images' unit-norm embeddings (the head's input, as the bank
    holds) appended; None stays None."""
    if bank is None:
        return None
    rows = torch.nn.functional.normalize(torch.from_numpy(embeddings).float(), dim=1)
    return torch.cat([bank, rows.to(bank.dtype)])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
