"""Plots for `medsec attack`: the metric against epsilon, and a grid of adversarial examples."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch


def plot_eps_curve(rows: Sequence[dict[str, Any]]) -> plt.Figure:
    """Adversarial metric against epsilon, one line per (attack, defence), clean level dotted."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["eps"] is not None:
            groups.setdefault((row["attack"], row["defense"]), []).append(row)
    for (attack, defense), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["eps"])
        eps = [255 * r["eps"] for r in group]
        line, = ax.plot(eps, [r["adversarial"] for r in group], marker="o",
                        label=attack if defense == "none" else f"{attack} + {defense}")
        ax.axhline(group[0]["clean"], color=line.get_color(), linestyle=":", linewidth=1)
    metric = rows[0]["metric"] if rows else "metric"
    ax.set(xlabel="epsilon (x 1/255, pixel units)", ylabel=f"test {metric}", ylim=(0, 1.02),
           title=f"robustness: test {metric} under attack (dotted: clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _show(ax: Any, image: torch.Tensor, **kwargs: Any) -> None:
    image = image.detach().cpu()
    if image.ndim == 4:  # 3D: middle slice
        image = image[..., image.shape[-1] // 2]
    array = image[0].numpy() if image.shape[0] == 1 else np.moveaxis(image[:3].numpy(), 0, -1)
    ax.imshow(array, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def adversarial_grid_png(sample: dict[str, torch.Tensor], class_names: Sequence[str], title: str,
                         count: int = 6) -> bytes:
    """PNG bytes of a grid: clean image, perturbation x10 (centred grey), adversarial image, with
    predictions as titles. Bytes, so the caller's output writer can seal them (patient images)."""
    count = min(count, len(sample["clean"]))
    fig, axes = plt.subplots(3, count, figsize=(1.9 * count, 6.0), squeeze=False)
    multiclass = sample["clean_logits"].ndim == 2 and len(class_names) == sample["clean_logits"].shape[1]

    def label(logits: torch.Tensor) -> str:
        if not multiclass:
            return ""
        probs = torch.softmax(logits, 0)
        return f"{class_names[int(probs.argmax())]} {float(probs.max()):.2f}"

    for i in range(count):
        clean, adversarial = sample["clean"][i], sample["adversarial"][i]
        _show(axes[0, i], clean, cmap="gray", vmin=0, vmax=1)
        _show(axes[1, i], (0.5 + 10 * (adversarial - clean)).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        _show(axes[2, i], adversarial, cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(label(sample["clean_logits"][i]), fontsize=8)
        axes[2, i].set_title(label(sample["adv_logits"][i]), fontsize=8, color="tab:red")
    for row, name in enumerate(("clean", "perturbation x10", "adversarial")):
        axes[row, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
