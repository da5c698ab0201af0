"""Figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas. The object API, not pyplot: no global figure
    state to leak in long-running processes, and a third of pyplot's import time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs val, with fine-tuning phases shaded if present."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 4))
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
    fig.savefig(path, dpi=100)
    return path


def confusion_matrix(matrix, classes: list[str], path: Path, normalize: bool = False) -> Path:
    m = np.asarray(matrix, dtype=float)
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.5 * n + 2)
    fig = _figure(figsize=(size, size))
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
    fig.savefig(path, dpi=100)
    return path
