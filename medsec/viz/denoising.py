"""Denoising pictures: noisy / denoised / clean side by side, as PNG bytes."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from medsec.viz.segmentation import middle_slice

COLUMNS = ("noisy", "denoised", "clean")


def psnr(image: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in dB of an image in [0, 1] against the clean one."""
    mse = float(np.mean((np.asarray(image, dtype=np.float64) - clean) ** 2))
    return 10 * np.log10(1 / mse) if mse > 0 else float("inf")


def denoising_grid_png(noisy: np.ndarray, denoised: np.ndarray, clean: np.ndarray, title: str = "") -> bytes:
    """One row per image (arrays (N, C, *spatial) in [0, 1]; first channel, middle slice in 3D),
    columns noisy / denoised / clean, each panel titled with its PSNR against the clean image."""
    rows = len(clean)
    fig = Figure(figsize=(7.5, 2.5 * rows + 0.4))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, images in zip(axes, zip(noisy, denoised, clean)):
        views = middle_slice(*images)
        for ax, view, column in zip(row, views, COLUMNS):
            ax.imshow(view, cmap="gray", vmin=0, vmax=1)
            label = column if column == "clean" else f"{column} {psnr(view, views[2]):.1f} dB"
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()
