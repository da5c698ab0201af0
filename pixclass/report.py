"""report.html: one self-contained page per training run or evaluation (figures embedded), with
the same figures as PNG files beside it.

Sections: run summary and config, data, training curves, metrics (named after the split they come
from), per-class table, confusion matrix (counts and normalized), most-confused pairs, the
worst-scored held-out images with their Grad-CAM overlays, and calibration (ECE with a
reliability diagram, before and after the run's temperature scaling; the share of images the
model answers "unknown").

A multi-label model's report has the summary, data, curves, its metrics (macro and micro F1, mAP,
exact-match accuracy) and a per-label table (precision, recall, F1 at the label's threshold,
average precision, threshold, support) in place of the sections that read one class per image."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import yaml

from . import plots
from .plot_worker import InlinePlotter
from .metrics import calibration, most_confused, per_sample_loss

SPLIT_NAMES = {"val": "Validation", "test": "Test", "train": "Training"}
SECTIONS = ("summary", "data", "curves", "metrics", "per-class", "confusion", "confused-pairs", "top-losses",
            "calibration")
MULTILABEL_SECTIONS = ("summary", "data", "curves", "metrics", "per-class")


def _evaluated_on(metrics: dict) -> str:
    if metrics.get("split"):
        return f"the {SPLIT_NAMES.get(metrics['split'], metrics['split']).lower()} split"
    return metrics.get("evaluated_on") or "the given data"


def img_tag(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def html_table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
         "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;"
         "margin:4px}section{margin-bottom:2em}pre{background:#f6f6f6;padding:8px}")


def html_page(title: str, body: str) -> str:
    """A self-contained page (no external resource) in the style of every pixclass report."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _top_losses(art, probs, labels, paths, out: Path, count: int = 12) -> tuple[Path | None, list[dict]]:
    """Gallery of the highest-loss test images, each with the Grad-CAM of its predicted class."""
    if not paths:
        return None, []
    losses = per_sample_loss(labels, probs)
    worst = np.argsort(-losses)[:count]
    rows = [{"path": str(paths[i]), "true": art.classes[labels[i]], "predicted": art.classes[int(probs[i].argmax())],
             "probability": float(probs[i].max()), "loss": float(losses[i])} for i in worst]
    items = []
    try:
        from .explain import Explainer, overlay
        with Explainer(art) as explainer:
            maps, _, batch = explainer.heatmaps([paths[i] for i in worst])
        for r, m, img in zip(rows, maps, batch):
            items.append((overlay(img, m), f"{Path(r['path']).name}\ntrue {r['true']} / pred {r['predicted']} "
                                          f"{r['probability']:.2f}"))
    except Exception as e:  # an explanation must never cost the report
        from .errors import first_line
        from .progress import warn
        warn(f"the report's Grad-CAM gallery is missing: {first_line(e)}")
        rows.append({"path": f"(Grad-CAM unavailable: {first_line(e)})", "true": "", "predicted": "", "probability": 0,
                     "loss": 0})
        return None, rows
    return plots.image_gallery(items, out / "top_losses.png"), rows


def _calibration_section(art, calib: dict, before: dict | None, figs: dict, probs: np.ndarray,
                         unknown_share: float | None = None) -> str:
    ece = f"<b>{calib['ece']:.4f}</b>"
    if before is not None:
        text = (f"<p>expected calibration error (15 bins): {before['ece']:.4f} before, {ece} after temperature "
                f"scaling (T = {art.temperature:.3f}, fitted on the validation split)</p>")
        images = img_tag(figs["reliability_before"]) + img_tag(figs["reliability"])
    else:
        text = f"<p>expected calibration error (15 bins): {ece} (temperature {art.temperature:.3f})</p>"
        images = img_tag(figs["reliability"])
    if art.abstain is not None:
        if unknown_share is None:  # from the probabilities: a knn_similarity threshold's fallback
            unknown_share = float(art.abstain.unknown(probs).mean()) if len(probs) else 0.0
        share = unknown_share
        text += (f"<p>answered <i>unknown</i> below a {html.escape(art.abstain.method.replace('_', ' '))} of "
                 f"{art.abstain.threshold:.4f} (keeps {art.abstain.keep:.0%} of the validation images): "
                 f"{share:.1%} of these images</p>")
    return text + images


def run_title(run_dir: Path) -> str:
    """The heading of a training run's report: the run folder's name, set apart from the words
    before it, so that a folder named `run` reads "pixclass run: run" rather than "pixclass run run"."""
    return f"pixclass run: {Path(run_dir).name}"


def metrics_section_title(metrics: dict) -> str:
    """Named after the split the numbers come from: a run without a test split reports on val."""
    split = metrics.get("split")
    return f"{SPLIT_NAMES.get(split, str(split).capitalize())} metrics" if split else "Metrics"


def write_report(out: Path, art, metrics: dict, probs: np.ndarray, labels: np.ndarray, paths: list,
                 history: list[dict] | None = None, counts: dict | None = None, title: str | None = None,
                 run_info: dict | None = None, plotter: InlinePlotter | None = None,
                 uncalibrated: np.ndarray | None = None) -> Path:
    """`probs`: the artifact's (calibrated) probabilities; `uncalibrated`: the same images' before
    temperature scaling (a training run's), shown beside them. `plotter`: where the matplotlib figures are drawn (a training run's PlotWorker draws them
    while this process computes the Grad-CAM gallery); in this process by default. `title`:
    `run_title(out)` by default."""
    out = Path(out)
    title = title or run_title(out)
    out.mkdir(parents=True, exist_ok=True)
    plotter = plotter or InlinePlotter()
    classes = art.classes
    if art.multilabel:
        return _write_multilabel_report(out, title, art, metrics, history, counts, run_info, plotter)
    cm = metrics["confusion_matrix"]
    calib = calibration(labels, probs)
    figs = {"confusion": plotter.submit(plots.confusion_matrix, cm, classes, out / "confusion_matrix.png"),
            "confusion_norm": plotter.submit(plots.confusion_matrix, cm, classes,
                                             out / "confusion_matrix_normalized.png", True),
            "reliability": plotter.submit(plots.reliability_diagram, calib["bins"], calib["ece"],
                                          out / "reliability.png",
                                          "after calibration" if uncalibrated is not None else "")}
    before = calibration(labels, uncalibrated) if uncalibrated is not None else None
    if before is not None:
        figs["reliability_before"] = plotter.submit(plots.reliability_diagram, before["bins"], before["ece"],
                                                    out / "reliability_uncalibrated.png", "before calibration")
    if history:
        figs["curves"] = plotter.submit(plots.training_curves, history, out / "curves.png")
    gallery, worst = _top_losses(art, probs, labels, paths, out)
    figs = {k: v.get() for k, v in figs.items()}
    pairs = most_confused(cm, classes)
    (out / "calibration.json").write_text(json.dumps(
        {**calib, "temperature": art.temperature, **({"before": before} if before else {})}, indent=2))

    s = _overview_sections(art, metrics, counts, run_info, figs.get("curves"))
    topk = next((k for k in metrics if k.startswith("top") and k.endswith("_accuracy")), None)
    headline = [["accuracy", f"{metrics['accuracy']:.4f}"], ["loss", f"{metrics['loss']:.4f}"],
                ["macro F1", f"{metrics['macro_f1']:.4f}"], ["images", metrics["n"]]]
    if topk:
        headline.insert(1, [topk.replace("_", " "), f"{metrics[topk]:.4f}"])
    if "accuracy_without_tta" in metrics:
        headline.insert(1, ["accuracy without TTA", f"{metrics['accuracy_without_tta']:.4f}"])
    robust = metrics.get("adversarial")
    if robust:  # a model trained with --adversarial: its accuracy under the attack beside the clean one
        headline.insert(1, [f"accuracy under {robust['attack']} ε={robust['eps_255']:g}/255 ({robust['n']} images)",
                            f"{robust['accuracy']:.4f}"])
    if "loo_accuracy" in metrics:  # the few-shot recipe's estimate from the training images themselves
        headline.append([f"{metrics['fewshot_estimate']} accuracy on the training images ({metrics['fewshot_head']})",
                         f"{metrics['loo_accuracy']:.4f}"])
    s["metrics"] = html_table(headline, ["metric", "value"]) + _absent_note(metrics)
    s["per-class"] = html_table([[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                             for r in metrics["per_class"]], ["class", "precision", "recall", "F1", "support"])
    s["confusion"] = img_tag(figs["confusion"]) + img_tag(figs["confusion_norm"])
    s["confused-pairs"] = html_table([[p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.1%}"] for p in pairs],
                                 ["true", "predicted as", "count", "share of true class"]) if pairs else \
        "<p>no confusions</p>"
    s["top-losses"] = (img_tag(gallery) if gallery else "") + html_table(
        [[Path(r["path"]).name, r["true"], r["predicted"], f"{r['probability']:.3f}", f"{r['loss']:.3f}"] for r in worst],
        ["image", "true", "predicted", "probability", "loss"])
    s["calibration"] = _calibration_section(art, calib, before, figs, probs, metrics.get("unknown_share"))
    titles = {"summary": "Run summary", "data": "Data", "curves": "Training curves",
              "metrics": metrics_section_title(metrics), "per-class": "Per-class precision, recall, F1",
              "confusion": "Confusion matrix",
              "confused-pairs": "Most-confused pairs", "top-losses": "Worst-scored images (top losses, Grad-CAM)",
              "calibration": "Calibration"}
    return _write_page(out, title, s, titles, SECTIONS)


def _write_page(out: Path, title: str, sections: dict, titles: dict, order) -> Path:
    body = "".join(f'<section id="{k}"><h2>{titles[k]}</h2>{sections[k]}</section>' for k in order)
    (out / "report.html").write_text(html_page(title, body))
    return out / "report.html"


def _overview_sections(art, metrics: dict, counts: dict | None, run_info: dict | None, curves: Path | None) -> dict:
    """The summary, data and curves sections, the same for every model."""
    s = {}
    info = dict(run_info or {})
    info.update({"model": art.arch["name"], "task": art.task, "test-time augmentation": art.tta,
                 "classes": len(art.classes), "input": f"{art.preprocess.channels}x"
                 f"{art.preprocess.size}x{art.preprocess.size}", "evaluated on": f"{_evaluated_on(metrics)} "
                 f"({metrics['n']} images)"})
    s["summary"] = html_table([[k, v] for k, v in info.items()], ["", ""]) + \
        f"<details><summary>config</summary><pre>{html.escape(yaml.safe_dump(art.config or {}, sort_keys=False))}</pre></details>"
    if counts:
        splits = sorted({sp for v in counts.values() for sp in v})
        s["data"] = html_table([[c] + [v.get(sp, 0) for sp in splits] for c, v in counts.items()], ["class"] + splits)
    else:
        s["data"] = "<p>per-class counts of the evaluated images are in the per-class table (support)</p>"
    s["curves"] = (img_tag(curves) if curves else "<p>no training curves: the few-shot classifier is fitted in "
                   "one step</p>" if "loo_accuracy" in metrics else
                   "<p>no training history (an evaluation of a saved model)</p>")
    return s


def _absent_note(metrics: dict) -> str:
    if not metrics.get("absent_classes"):
        return ""
    return (f"<p>not evaluated (no image of theirs in {html.escape(_evaluated_on(metrics))}): "
            f"<b>{html.escape(', '.join(metrics['absent_classes']))}</b>; macro F1 is over the other "
            f"classes</p>")


def _write_multilabel_report(out: Path, title: str, art, metrics: dict, history, counts, run_info, plotter) -> Path:
    curves = plotter.submit(plots.training_curves, history, out / "curves.png").get() if history else None
    s = _overview_sections(art, metrics, counts, run_info, curves)
    headline = [["macro F1", f"{metrics['macro_f1']:.4f}"], ["micro F1", f"{metrics['micro_f1']:.4f}"],
                ["mAP", f"{metrics['mAP']:.4f}"], ["exact match (every label right)", f"{metrics['accuracy']:.4f}"],
                ["binary cross-entropy", f"{metrics['loss']:.4f}"], ["images", metrics["n"]]]
    s["metrics"] = html_table(headline, ["metric", "value"]) + _absent_note(metrics)
    s["per-class"] = html_table([[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                                  f"{r['average_precision']:.3f}", f"{r['threshold']:.3f}", r["support"]]
                                 for r in metrics["per_class"]],
                                ["label", "precision", "recall", "F1", "AP", "threshold", "support"])
    titles = {"summary": "Run summary", "data": "Data (images per label)", "curves": "Training curves",
              "metrics": metrics_section_title(metrics),
              "per-class": "Per-label precision, recall, F1 (at the label's threshold, tuned on validation), AP"}
    return _write_page(out, title, s, titles, MULTILABEL_SECTIONS)
