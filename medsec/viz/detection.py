"""Detection figures as PNG bytes: the FROC curve, and images with ground-truth and predicted boxes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medsec.analysis.detection_metrics import FROC, FROC_RATES
from medsec.viz.plots import png_bytes
from medsec.viz.segmentation import COLOURS


def froc_png(froc: FROC, title: str = "FROC", rates: Sequence[float] = FROC_RATES) -> bytes:
    """The FROC curve (sensitivity against false positives per image, log scale) with the
    reported rates marked."""
    fppi, sensitivity, _ = froc.curve()
    at = froc.sensitivity_at(rates)
    low = min(rates) / 2
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    if len(fppi):
        # the curve holds its last sensitivity at any higher rate
        ax.step(np.r_[low, np.maximum(fppi, low), max(rates) * 1.5], np.r_[0.0, sensitivity, sensitivity[-1]],
                where="post", label="FROC")
    ax.plot(list(at), list(at.values()), "o", label="reported rates")
    ax.set_xscale("log")
    ax.set_xlim(low, max(rates) * 1.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title} ({froc.num_lesions} lesions, {froc.num_images} images)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig, dpi=100)


def boxes_png(image: np.ndarray, truth: dict[str, np.ndarray], predicted: dict[str, np.ndarray],
              class_names: Sequence[str], title: str = "", min_score: float = 0.3) -> bytes:
    """One image (channel-first, 2D; 3D: the middle slice along the last axis) with its ground-truth
    boxes (dashed) and the predicted boxes scoring at least ``min_score`` (solid, with class and
    score). Boxes are row-first corners (:mod:`medsec.data.detection`)."""
    view = np.asarray(image)[0]
    index = None
    if view.ndim == 3:
        index = view.shape[-1] // 2
        view = view[..., index]
    fig = Figure(figsize=(4.5, 4.8))
    ax = fig.subplots()
    ax.imshow(view, cmap="gray", vmin=0, vmax=1)
    for boxes, labels, scores, dashed in ((truth["boxes"], truth["labels"], None, True),
                                          (predicted["boxes"], predicted["labels"], predicted["scores"], False)):
        for k, (box, label) in enumerate(zip(np.asarray(boxes), np.asarray(labels))):
            score = None if scores is None else float(scores[k])
            if score is not None and score < min_score:
                continue
            dims = len(box) // 2
            if index is not None and not box[2] <= index < box[5]:
                continue  # a 3D box that misses the slice shown
            colour = COLOURS[int(label) % len(COLOURS)]
            ax.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[dims + 1] - box[1], box[dims] - box[0],
                                   fill=False, edgecolor=colour, linewidth=1.5, linestyle="--" if dashed else "-"))
            if score is not None:
                ax.text(box[1] - 0.5, box[0] - 1, f"{class_names[int(label)]} {score:.2f}", color="white", fontsize=7,
                        bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "linewidth": 0})
    ax.set_title(f"{title}\ndashed: ground truth, solid: detections >= {min_score}", fontsize=8)
    ax.axis("off")
    return png_bytes(fig, dpi=100)
