"""Segmentation overlays: image, ground truth and prediction side by side, as PNG bytes."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def middle_slice(*volumes: np.ndarray) -> list[np.ndarray]:
    """2D views of (channel-first) ``volumes``: the first channel, and for 3D the slice along the
    last axis in the middle of the first volume's foreground (its middle slice when it has none)."""
    views = [np.asarray(v)[0] for v in volumes]
    if views[0].ndim == 2:
        return views
    labelled = np.flatnonzero(np.asarray(volumes[1])[0].reshape(-1, views[0].shape[-1]).any(0)) \
        if len(volumes) > 1 else np.array([])
    index = int(labelled[[0, -1]].mean()) if labelled.size else views[0].shape[-1] // 2
    return [v[..., index] for v in views]


def overlay_png(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, class_names: Sequence[str],
                title: str = "") -> bytes:
    """Three panels (image; ground truth; prediction) of one case as PNG bytes. Arrays are
    channel-first, 2D or 3D (middle slice of the labelled region); label maps hold 0..K."""
    img, gt, pred = middle_slice(image, label, prediction)
    colours = ListedColormap(COLOURS[: max(len(class_names), 1)])
    fig = Figure(figsize=(9, 3.3))
    axes = fig.subplots(1, 3)
    for ax, mask, name in zip(axes, (None, gt, pred), ("image", "ground truth", "prediction")):
        ax.imshow(img.T, cmap="gray", origin="lower")
        if mask is not None:
            shown = np.ma.masked_where(mask.T == 0, mask.T - 1)
            ax.imshow(shown, cmap=colours, vmin=0, vmax=max(len(class_names) - 1, 1), alpha=0.5,
                      origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    legend = ", ".join(f"{k + 1}={n}" for k, n in enumerate(class_names))
    fig.suptitle(f"{title}  ({legend})" if title else legend, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()
