"""`pixclass suggest`: which unlabeled images to label next, for a saved model. The model's
probabilities and embeddings of the images (embeddings.py) go through the ranking of
suggest_rank.py; the picks are written as suggest.csv (path, score, top classes) and
suggest.html (thumbnails, to label from)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from . import artifact as artifact_io
from .audit_report import thumbnail
from .data.scan import collect_image_paths
from .embeddings import embed_files
from .errors import UserError
from .suggest_rank import MEASURES, pick_diverse, uncertainty

TOP_CLASSES = 3


def suggest(model_dir: Path, unlabeled: Path, n: int, out: Path, measure: str = "margin") -> dict:
    if measure not in MEASURES:
        raise UserError(f"--by must be one of {', '.join(MEASURES)} (got {measure!r})")
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if not Path(unlabeled).is_dir():
        raise UserError(f"not a folder: {unlabeled}")
    art = artifact_io.load(model_dir)
    paths = collect_image_paths([Path(unlabeled)])
    if not paths:
        raise UserError(f"no image files in {unlabeled}")
    embedded = embed_files(art, paths)
    scores = uncertainty(embedded.probabilities, measure)
    picks = pick_diverse(scores, embedded.embeddings, n)
    rows = [{"rank": r + 1, "path": str(embedded.paths[i]), "score": round(float(scores[i]), 4),
             "top_classes": _top(embedded.probabilities[i], art.classes)} for r, i in enumerate(picks)]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "suggest.csv")
    _write_html(rows, out / "suggest.html", model_dir, unlabeled, measure, len(embedded.paths))
    return {"out": str(out), "suggested": len(rows), "images": len(embedded.paths), "measure": measure,
            "diversity": embedded.embeddings is not None, "skipped_files": [str(p) for p, _ in embedded.failures]}


def _top(probs, classes: list[str]) -> str:
    order = probs.argsort()[::-1][:TOP_CLASSES]
    return " ".join(f"{classes[k]}:{probs[k]:.3f}" for k in order)


def _write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "path", "score", "top_classes"])
        writer.writeheader()
        writer.writerows(rows)


def _write_html(rows: list[dict], path: Path, model_dir, unlabeled, measure: str, total: int) -> None:
    cells = "".join(f'<figure>{thumbnail(r["path"], 128)}<figcaption>#{r["rank"]} {html.escape(Path(r["path"]).name)}'
                    f'<br>{measure} {r["score"]:.3f}<br>{html.escape(r["top_classes"])}</figcaption></figure>'
                    for r in rows)
    path.write_text(f"<!doctype html><meta charset=utf-8><title>pixclass suggest</title>"
                    f"<style>figure{{display:inline-block;width:150px;margin:6px;font:12px sans-serif;"
                    f"vertical-align:top}}</style><h1>Label these next</h1>"
                    f"<p>{len(rows)} of {total} images in {html.escape(str(unlabeled))}, most uncertain first "
                    f"({measure}) for the model {html.escape(str(model_dir))}, one per group of similar uncertain "
                    f"images</p>{cells}")
