"""Figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def new_figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas. The object API, not pyplot: no global figure
    state to leak in long-running processes, and a third of pyplot's import time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path, dpi: int = 100) -> Path:
    """PNG at zlib level 1: several times faster to write than the default level 6, for files
    about a third larger."""
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs val, with fine-tuning phases shaded if present."""
    epochs = [h["epoch"] for h in history]
    fig = new_figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=f"train {key}")
        if any(h.get(f"val_{key}") is not None for h in history):
            ax.plot(epochs, [h.get(f"val_{key}") for h in history], "o-", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save(fig, path, 100)


def confusion_matrix(matrix, classes: list[str], path: Path, normalize: bool = False) -> Path:
    m = np.asarray(matrix, dtype=float)
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.5 * n + 2)
    fig = new_figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = m.max() or 1
        for i in range(n):
            for j in range(n):
                text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if m[i, j] > top / 2 else "black")
    ax.set_title("confusion matrix" + (" (normalized by row)" if normalize else ""))
    fig.tight_layout()
    return save(fig, path, 100)


def reliability_diagram(table: list[dict], ece: float, path: Path, title: str = "") -> Path:
    fig = new_figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    centers = [(b["low"] + b["high"]) / 2 for b in table]
    width = table[0]["high"] - table[0]["low"] if table else 0.1
    acc = [b["accuracy"] or 0 for b in table]
    ax.bar(centers, acc, width=width * 0.95, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability{' ' + title if title else ''} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save(fig, path, 100)


def image_gallery(items: list[tuple[np.ndarray, str]], path: Path, cols: int = 4) -> Path:
    """A grid of RGB images (H x W x 3 in [0, 1]) with captions, composed with Pillow: much faster
    than a matplotlib grid of images, which was a visible part of a short run's report."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=12)
    tile = max(160, max((img.shape[0] for img, _ in items), default=0))
    line_h, pad = 15, 8
    lines = max((len(caption.splitlines()) for _, caption in items), default=1)
    cell_w, cell_h = tile + 2 * pad, tile + pad + lines * line_h + pad
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, caption) in enumerate(items):
        x, y = (k % cols) * cell_w + pad, (k // cols) * cell_h + pad
        picture = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        if picture.size != (tile, tile):  # small images (CIFAR's 32 px) enlarged with visible pixels
            picture = picture.resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(picture, (x, y))
        for i, text in enumerate(caption.splitlines()):
            while len(text) > 1 and draw.textlength(text, font=font) > tile:  # long file names: cut short
                text = text[:-2] + "…"
            draw.text((x, y + tile + 3 + i * line_h), text, fill="black", font=font)
    sheet.save(path, compress_level=1)
    return path


def robustness_curves(results: dict, path: Path) -> Path:
    """Accuracy against corruption severity (one line per corruption) and against the attacks' ε."""
    fig = new_figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    clean = results["clean_accuracy"]
    for name, c in results["corruptions"].items():
        rows = c["severities"]
        left.plot([0] + [r["severity"] for r in rows], [clean] + [r["accuracy"] for r in rows], "o-", label=name)
    left.set_xlabel("severity (0: clean)")
    left.set_xticks(range(0, 1 + max(len(c["severities"]) for c in results["corruptions"].values())))
    left.set_title("common corruptions")
    for name, rows in results["attacks"].items():
        right.plot([0] + [r["eps_255"] for r in rows], [clean] + [r["accuracy"] for r in rows], "o-", label=name.upper())
    right.set_xlabel("ε (1/255 pixel steps)")
    right.set_title("adversarial attacks (L∞)")
    for ax in (left, right):
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path, 100)


def lr_find_curve(lrs: list[float], losses: list[float], suggestions: dict[str, float], path: Path) -> Path:
    """The learning-rate range test: smoothed loss against the rate (log scale), each suggested
    rate marked."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    for (name, lr), color in zip(suggestions.items(), ("tab:red", "tab:green")):
        ax.axvline(lr, color=color, linestyle="--", label=f"{name} {lr:.1e}")
    ax.legend()
    fig.tight_layout()
    return save(fig, path)
