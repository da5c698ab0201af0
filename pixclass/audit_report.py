"""Presenting an audit: a summary table on the terminal, audit.json, and audit.html with a
thumbnail of every problem file (one self-contained page, images embedded). With `--labels`, the
likely label errors too (label_issues.LabelIssues.to_dict()), in both files, and as
label_issues.csv: the decisions file `--fix relabel` reads once the accept column is filled in."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from .data.audit import AuditReport
from .data.decode import decode_image
from .errors import ImageDecodeError

TITLES = {
    "unreadable": "Unreadable files (corrupt, truncated, zero-byte, not images)",
    "ignored_extension": "Images without an image extension (not used for training)",
    "hidden": "Hidden files and folders",
    "stray_files": "Files outside class folders",
    "empty_classes": "Empty classes",
    "tiny": "Tiny images",
    "mixed_modes": "Mixed colour modes",
    "exif_rotated": "EXIF-rotated images",
    "animated": "Animated images",
    "duplicates": "Duplicates within a class",
    "conflicting_labels": "Same image in different classes (conflicting labels)",
    "leakage": "Same image in different splits (train/test leakage)",
}


def summary_rows(report: AuditReport) -> list[tuple[str, int]]:
    return [(TITLES[k], len(report.problems.get(k, []))) for k in TITLES]


def print_summary(report: AuditReport, console) -> None:
    from rich.table import Table
    counts = Table(title=f"classes in {report.root} ({report.layout})")
    splits = sorted({s for v in report.counts.values() for s in v})
    counts.add_column("class")
    for s in splits:
        counts.add_column(s, justify="right")
    for c, v in report.counts.items():
        counts.add_row(c, *(str(v.get(s, 0)) for s in splits))
    console.print(counts)
    console.print(f"imbalance ratio (largest / smallest class): {report.imbalance_ratio}")
    table = Table(title="problems")
    table.add_column("check")
    table.add_column("found", justify="right")
    for title, n in summary_rows(report):
        table.add_row(title, f"[red]{n}[/red]" if n else "0")
    console.print(table)
    for kind, items in report.problems.items():
        for item in items[:5]:
            where = item.get("path") or ", ".join(item.get("paths", [])) or item.get("class")
            console.print(f"  {kind}: {where}  {item.get('reason', item.get('match', ''))}", markup=False)
        if len(items) > 5:
            console.print(f"  {kind}: ... and {len(items) - 5} more", markup=False)


def write_json(report: AuditReport, path: Path, labels: dict | None = None) -> Path:
    path.write_text(json.dumps({**report.to_dict(), **({"label_issues": labels} if labels else {})}, indent=2))
    return path


def write_decisions(labels: dict, path: Path) -> Path:
    """label_issues.csv: one row per likely label error, ranked; `accept` left for the user."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "given", "suggested", "score", "accept"])
        writer.writerows([i["path"], i["given"], i["suggested"], i["score"], ""] for i in labels["issues"])
    return path


def _label_issues_html(labels: dict, shown: int = 300) -> str:
    issues = labels["issues"]
    parts = [f"<h2>Likely label errors ({len(issues)} of {labels['images']} images)</h2>",
             f"<p>Out-of-fold predictions of {labels['folds']} logistic-regression heads on {labels['backbone']} "
             f"features (accuracy {labels['out_of_fold_accuracy']}); score: the probability of the given label, "
             "lowest first. Mark the ones to move in label_issues.csv's accept column, then run "
             "<code>pixclass audit DATA --fix relabel label_issues.csv</code>.</p><div class='grid'>"]
    for i in issues[:shown]:
        parts.append(f"<div class='item'><figure>{thumbnail(i['path'])}<figcaption>{html.escape(i['path'])}"
                     f"</figcaption></figure><p>given <b>{html.escape(i['given'])}</b> &rarr; suggested "
                     f"<b>{html.escape(i['suggested'])}</b><br>score {i['score']}</p></div>")
    if len(issues) > shown:
        parts.append(f"<p>... and {len(issues) - shown} more in label_issues.csv</p>")
    return "".join(parts) + "</div>"


def thumbnail(path: str, size: int = 96) -> str:
    try:
        img = decode_image(path)
    except (ImageDecodeError, OSError):
        return '<div class="bad">unreadable</div>'
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'


def write_html(report: AuditReport, path: Path, labels: dict | None = None) -> Path:
    parts = [f"<h1>Dataset audit: {html.escape(str(report.root))}</h1>",
             f"<p>{len(report.files)} files checked ({report.layout}); imbalance ratio {report.imbalance_ratio}</p>",
             "<table><tr><th>check</th><th>found</th></tr>"]
    parts += [f"<tr><td>{html.escape(t)}</td><td>{n}</td></tr>" for t, n in summary_rows(report)]
    parts.append("</table>")
    splits = sorted({s for v in report.counts.values() for s in v})
    parts.append("<h2>Class counts</h2><table><tr><th>class</th>" + "".join(f"<th>{s}</th>" for s in splits) + "</tr>")
    parts += [f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{v.get(s, 0)}</td>" for s in splits) + "</tr>"
              for c, v in report.counts.items()]
    parts.append("</table>")
    if labels:
        parts.append(_label_issues_html(labels))
    for kind, title in TITLES.items():
        items = report.problems.get(kind, [])
        if not items:
            continue
        parts.append(f"<h2>{html.escape(title)} ({len(items)})</h2><div class='grid'>")
        for item in items[:200]:
            paths = item.get("paths") or ([item["path"]] if "path" in item else [])
            cards = "".join(f"<figure>{thumbnail(p) if kind not in ('hidden',) else ''}"
                            f"<figcaption>{html.escape(p)}</figcaption></figure>" for p in paths)
            note = html.escape(str(item.get("reason") or item.get("match", "")) + (f" ({item['class']})" if item.get("class") and not paths else ""))
            parts.append(f"<div class='item'><p>{note}</p>{cards}</div>")
        parts.append("</div>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px}.grid{display:flex;flex-wrap:wrap;gap:12px}.item{border:1px solid #ddd;padding:6px}"
             "figure{display:inline-block;margin:4px;max-width:160px}figcaption{font-size:11px;word-break:break-all}"
             ".bad{width:96px;height:96px;background:#fdd;display:flex;align-items:center;justify-content:center}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>pixclass audit</title><style>{style}"
                    f"</style></head><body>{''.join(parts)}</body></html>")
    return path
