"""Plots of the security report: grey-level histograms and adjacent-pixel scatter, plain vs cipher."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medsec.analysis.ciphers.statistics import DIRECTIONS, LEVELS, adjacent_pairs, histograms
from medsec.viz.plots import _save, plt


def plot_histograms(plain: np.ndarray, cipher: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Pooled grey-level histograms of the plain and the cipher images, with the uniform level."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, images, name in zip(axes, (plain, cipher), ("plain", "cipher")):
        share = histograms(images).sum(0) / np.asarray(images).size
        ax.bar(np.arange(LEVELS), share, width=1.0, color="tab:blue" if name == "plain" else "tab:red")
        ax.axhline(1 / LEVELS, color="black", ls="--", lw=1, label="uniform")
        ax.set(xlim=(-1, LEVELS), xlabel="grey level", ylabel="share of pixels",
               title=f"{name} images")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "grey-level histograms")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_adjacent_scatter(plain: np.ndarray, cipher: np.ndarray, path: str | Path, points: int = 3000,
                          seed: int = 0, title: str = "") -> Path:
    """Neighbouring-pixel pairs of one plain and one cipher image, per direction (random subset)."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, len(DIRECTIONS), figsize=(10, 6.6))
    for row, (image, name) in enumerate(((plain, "plain"), (cipher, "cipher"))):
        for ax, direction in zip(axes[row], DIRECTIONS):
            x, y = adjacent_pairs(image, direction)
            pick = rng.choice(x.size, size=min(points, x.size), replace=False)
            ax.scatter(x[pick], y[pick], s=1, alpha=0.5, color="tab:blue" if row == 0 else "tab:red")
            ax.set(xlim=(0, 255), ylim=(0, 255), title=f"{name}, {direction}", xlabel="pixel (x, y)",
                   ylabel="neighbour")
    fig.suptitle(title or "adjacent-pixel correlation")
    fig.tight_layout()
    return _save(fig, Path(path))
