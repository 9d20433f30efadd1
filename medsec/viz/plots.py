"""Plots for run directories: ROC curves, confusion matrices, sample grids (matplotlib; its default backend, Agg without a display)."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from medsec.utils.outputs import OutputWriter


def png_bytes(fig: plt.Figure, dpi: int = 120) -> bytes:
    """``fig`` as PNG bytes (then closed), for writers that may seal what they write."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]], names: Sequence[str], aucs: Sequence[float],
             title: str = "ROC curves (test)") -> plt.Figure:
    """One ROC curve per class (one-vs-rest) with its AUROC in the legend."""
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
    for (fpr, tpr), name, auc, colour in zip(curves, names, aucs, colours):
        if np.isfinite(auc):
            ax.plot(fpr, tpr, lw=1.6, color=colour, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8 if len(names) > 6 else 9, title="class (AUROC)")
    ax.grid(alpha=0.3)
    return fig


def plot_confusion(matrix: np.ndarray, names: Sequence[str]) -> plt.Figure:
    """Row-normalised confusion matrix with counts (multi-class)."""
    counts = np.asarray(matrix)
    rates = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(counts.shape):
        ax.text(j, i, f"{counts[i, j]:d}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.6 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true",
           title="confusion matrix (test)")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return fig


def plot_multilabel_confusion(matrices: np.ndarray, names: Sequence[str]) -> plt.Figure:
    """One 2x2 confusion matrix per finding (multi-label)."""
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows), squeeze=False)
    for ax, m, name in zip(axes.flat, matrices, names):
        ax.imshow(m / max(m.sum(), 1), cmap="Blues", vmin=0, vmax=1)
        for i, j in np.ndindex(2, 2):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=9)
        ax.set(title=name, xticks=[0, 1], yticks=[0, 1], xticklabels=["-", "+"], yticklabels=["-", "+"])
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("per-finding confusion (rows true, columns predicted at 0.5)")
    fig.tight_layout()
    return fig


def save_classification_plots(curves: dict[str, Any], writer: OutputWriter) -> list[Path]:
    """Write ``plots/roc_curves.png`` and ``plots/confusion_matrix.png`` from a task's
    ``test_curves`` through ``writer`` (sealed when the run encrypts its outputs)."""
    names = curves["class_names"]
    roc = curves["roc"]
    aucs = curves["auroc"]
    if not curves["multilabel"] and len(names) == 2:  # binary: one curve tells it all
        roc, names_roc, aucs = roc[1:], [names[1]], aucs[1:]
    else:
        names_roc = names
    confusion = plot_multilabel_confusion if curves["multilabel"] else plot_confusion
    return [writer.write("plots/roc_curves.png", png_bytes(plot_roc(roc, names_roc, aucs))),
            writer.write("plots/confusion_matrix.png", png_bytes(confusion(curves["confusion"], names)))]


def save_sample_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, cols: int = 8) -> Path:
    """A grid of images (N, C, H, W) in [0, 1] with a title each (for ``log_images`` and notebooks)."""
    images = np.asarray(images)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))
