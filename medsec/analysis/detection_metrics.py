"""Detection metrics: COCO mAP (torchmetrics' ``MeanAveragePrecision``, pycocotools backend; 2D) or
MONAI's COCO metric (3D), and FROC (sensitivity at fixed false positives per image), which no
library provides (its plot: :func:`medsec.viz.detection.froc_png`).

Boxes are in corner form ``(min_0, min_1[, min_2], max_0, max_1[, max_2])`` along the array axes
(MONAI's standard mode), pixel-edge coordinates; classes are 0-based foreground indices.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data.box_utils import box_iou

FROC_RATES = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per image at which FROC sensitivity is reported."""
CHESTX_DET10_RATES = (0.05, 0.1, 0.2)
"""ChestX-Det10's criterion: mean sensitivity over these rates."""
CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""LUNA16's competition performance metric (CPM): mean sensitivity over these rates."""

Detections = Mapping[str, torch.Tensor]
"""``boxes`` ``(K, 2 * dims)``, ``labels`` ``(K,)`` and, for predictions, ``scores`` ``(K,)``."""


def rate_name(rate: float) -> str:
    """``0.05`` -> ``0_05``, ``1.0`` -> ``1``: a false-positive rate in a metric name."""
    return f"{rate:g}".replace(".", "_")


def match_image(pred: Detections, target: Detections, iou_threshold: float = 0.5) -> np.ndarray:
    """Per prediction (in descending score order): is it a true positive? Greedy matching as COCO
    does: each prediction, best score first, takes the unmatched ground-truth box of its class with
    the highest IoU, if that IoU reaches ``iou_threshold``; a second hit on a matched box is a false
    positive."""
    scores = pred["scores"].detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, labels = pred["boxes"].detach().cpu()[order], pred["labels"].detach().cpu()[order]
    gt_boxes, gt_labels = target["boxes"].detach().cpu(), target["labels"].detach().cpu()
    hit = np.zeros(len(order), dtype=bool)
    if len(order) == 0 or len(gt_boxes) == 0:
        return hit
    iou = torch.as_tensor(box_iou(boxes.double(), gt_boxes.double()))
    iou[labels[:, None] != gt_labels[None, :]] = -1.0
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in range(len(order)):
        candidates = torch.where(taken, torch.full_like(iou[i], -1.0), iou[i])
        best = int(torch.argmax(candidates))
        if candidates[best] >= iou_threshold:
            taken[best] = True
            hit[i] = True
    return hit


@dataclass
class FROC:
    """Accumulates detections image by image; :meth:`compute` gives the FROC curve.

    Sensitivity at ``r`` false positives per image is the highest sensitivity reached at a score
    threshold whose false positives per image do not exceed ``r`` (0 if none does): a step
    function, no interpolation. All detections scoring at or above a threshold count together.
    """

    iou_threshold: float = 0.5
    scores: list[np.ndarray] = field(default_factory=list)
    hits: list[np.ndarray] = field(default_factory=list)
    num_images: int = 0
    num_lesions: int = 0

    def update(self, preds: Sequence[Detections], targets: Sequence[Detections]) -> None:
        for pred, target in zip(preds, targets, strict=True):
            self.scores.append(np.sort(pred["scores"].detach().float().cpu().numpy())[::-1])
            self.hits.append(match_image(pred, target, self.iou_threshold))
            self.num_images += 1
            self.num_lesions += len(target["labels"])

    def reset(self) -> None:
        self.scores, self.hits, self.num_images, self.num_lesions = [], [], 0, 0

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(false positives per image, sensitivity, score threshold), one point per distinct score,
        thresholds descending."""
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        hits = np.concatenate(self.hits) if self.hits else np.zeros(0, dtype=bool)
        order = np.argsort(-scores, kind="stable")
        scores, hits = scores[order], hits[order]
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
        fppi = fp[last] / max(self.num_images, 1)
        sensitivity = tp[last] / self.num_lesions if self.num_lesions else np.full(last.sum(), np.nan)
        return fppi.astype(float), sensitivity.astype(float), scores[last].astype(float)

    def sensitivity_at(self, rates: Sequence[float]) -> dict[float, float]:
        """Sensitivity at each false-positive rate (``nan`` without ground-truth lesions)."""
        if not self.num_lesions:
            return {rate: float("nan") for rate in rates}
        fppi, sensitivity, _ = self.curve()
        return {rate: float(sensitivity[fppi <= rate].max(initial=0.0)) for rate in rates}

    def compute(self, rates: Sequence[float] = FROC_RATES) -> dict[str, float]:
        """``froc_<rate>`` for each rate, ``froc_mean`` (over ``rates``), ``froc_chestx_det10``
        (mean over 0.05/0.1/0.2) and ``froc_cpm`` (LUNA16: mean over 0.125-8)."""
        at = self.sensitivity_at(sorted({*rates, *CHESTX_DET10_RATES, *CPM_RATES}))
        values = {f"froc_{rate_name(r)}": at[r] for r in rates}
        values["froc_mean"] = float(np.mean([at[r] for r in rates]))
        values["froc_chestx_det10"] = float(np.mean([at[r] for r in CHESTX_DET10_RATES]))
        values["froc_cpm"] = float(np.mean([at[r] for r in CPM_RATES]))
        return values


class DetectionMetrics:
    """COCO mAP, per-class AP and FROC over a stage's images.

    2D: torchmetrics' ``MeanAveragePrecision`` (pycocotools backend, area ranges meaningless at
    our sizes are left out of the result); 3D: MONAI's ``COCOMetric`` (same COCO definition,
    3D IoU). Returned names: ``map`` (IoU 0.5:0.95), ``map_50``, ``map_75``, ``mar_100``,
    ``ap_<class>`` (0.5:0.95), ``ap50_<class>``, the FROC values (:meth:`FROC.compute`) and
    ``mean_iou`` (mean over ground-truth boxes of the best IoU of a same-class prediction).
    """

    def __init__(self, slugs: Sequence[str], spatial_dims: int = 2, iou_threshold: float = 0.5) -> None:
        self.slugs = list(slugs)
        self.spatial_dims = spatial_dims
        self.froc = FROC(iou_threshold)
        self.preds: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []
        self.ids: list[str] = []

    def reset(self) -> None:
        self.froc.reset()
        self.preds, self.targets, self.ids = [], [], []

    def update(self, preds: Sequence[Detections], targets: Sequence[Detections],
               ids: Sequence[str] | None = None) -> None:
        """Add a batch; ``ids`` name its images (for :meth:`synced`; default: their order)."""
        preds = [{k: pred[k].detach().cpu() for k in ("boxes", "scores", "labels")} for pred in preds]
        targets = [{k: target[k].detach().cpu() for k in ("boxes", "labels")} for target in targets]
        self.ids += list(ids) if ids is not None else [str(len(self.ids) + i) for i in range(len(preds))]
        self.preds += preds
        self.targets += targets
        self.froc.update(preds, targets)

    def synced(self) -> DetectionMetrics:
        """These metrics over every DDP rank's images, each image once (DDP's sampler repeats a few
        to even out the ranks); themselves outside DDP."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(zip(self.ids, self.preds, self.targets)))
        rows = {image: (pred, target) for part in gathered for image, pred, target in part}
        merged = DetectionMetrics(self.slugs, self.spatial_dims, self.froc.iou_threshold)
        merged.update([p for p, _ in rows.values()], [t for _, t in rows.values()], list(rows))
        return merged

    def mean_iou(self) -> float:
        """Mean over ground-truth boxes of the best IoU with a prediction of the same class (0 when
        none); ``nan`` without ground-truth boxes."""
        best: list[float] = []
        for pred, target in zip(self.preds, self.targets):
            if len(target["boxes"]) == 0:
                continue
            if len(pred["boxes"]) == 0:
                best += [0.0] * len(target["boxes"])
                continue
            iou = torch.as_tensor(box_iou(target["boxes"].double(), pred["boxes"].double()))
            iou[target["labels"][:, None] != pred["labels"][None, :]] = 0.0
            best += iou.max(1).values.tolist()
        return float(np.mean(best)) if best else float("nan")

    def compute(self) -> dict[str, float]:
        coco = self._coco_2d() if self.spatial_dims == 2 else self._coco_3d()
        return coco | self.froc.compute() | {"mean_iou": self.mean_iou()}

    def _coco_2d(self) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        # torchmetrics reads boxes as (x1, y1, x2, y2); ours are along the array axes (row first):
        # IoU is the same either way, and swapping keeps its area ranges right.
        swap = [1, 0, 3, 2]
        preds = [{**p, "boxes": p["boxes"][:, swap].float()} for p in self.preds]
        targets = [{**t, "boxes": t["boxes"][:, swap].float()} for t in self.targets]
        values: dict[str, float] = {}
        for thresholds, prefix in ((None, "ap"), ([0.5], "ap50")):
            metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                          backend="pycocotools", iou_thresholds=thresholds)
            metric.update(preds, targets)
            result = metric.compute()
            classes = result["classes"].reshape(-1).tolist()
            per_class = dict(zip(classes, result["map_per_class"].reshape(-1).tolist()))
            if thresholds is None:
                values |= {name: float(result[name]) for name in ("map", "map_50", "map_75", "mar_100")}
            values |= {f"{prefix}_{slug}": _undefined(per_class.get(k, -1.0)) for k, slug in enumerate(self.slugs)}
        return {k: _undefined(v) for k, v in values.items()}

    def _coco_3d(self) -> dict[str, float]:
        from monai.apps.detection.metrics.coco import COCOMetric
        from monai.apps.detection.metrics.matching import matching_batch

        classes = [str(k) for k in range(len(self.slugs))]
        metric = COCOMetric(classes=classes, iou_list=[0.5, 0.75], iou_range=(0.5, 0.95, 0.05), max_detection=[100])
        results = matching_batch(
            iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
            pred_boxes=[p["boxes"].numpy() for p in self.preds], pred_classes=[p["labels"].numpy() for p in self.preds],
            pred_scores=[p["scores"].numpy() for p in self.preds],
            gt_boxes=[t["boxes"].numpy() for t in self.targets], gt_classes=[t["labels"].numpy() for t in self.targets],
            max_detections=100)
        previous = logging.root.manager.disable
        logging.disable(logging.INFO)  # MONAI's COCO metric logs three INFO lines per call on the root logger
        try:
            coco = metric(results)[0]
        finally:
            logging.disable(previous)
        # MONAI's overall figures average in the -1 of classes without ground truth: mean the
        # defined per-class values instead, as COCO does
        def per_class(name: str) -> list[float]:
            return [_undefined(float(coco.get(f"{k}_{name}", -1.0))) for k in range(len(self.slugs))]

        def mean(name: str) -> float:
            defined = [v for v in per_class(name) if not np.isnan(v)]
            return float(np.mean(defined)) if defined else float("nan")

        full, half = "mAP_IoU_0.50_0.95_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100"
        values = {"map": mean(full), "map_50": mean(half), "map_75": mean("AP_IoU_0.75_MaxDet_100"),
                  "mar_100": mean("mAR_IoU_0.50_0.95_0.05_MaxDet_100")}
        values |= {f"ap_{slug}": v for slug, v in zip(self.slugs, per_class(full))}
        values |= {f"ap50_{slug}": v for slug, v in zip(self.slugs, per_class(half))}
        return values


def _undefined(value: float) -> float:
    """COCO tools say -1 for "no ground truth": ``nan`` here, as every other undefined metric."""
    return float("nan") if value < 0 else float(value)
