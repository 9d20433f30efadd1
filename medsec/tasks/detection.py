"""Lesion detection: boxes with classes and scores, in 2D images (torchvision Faster R-CNN,
RetinaNet) and 3D volumes (MONAI RetinaNet)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsec.analysis.detection_metrics import DetectionMetrics
from medsec.data.detection import unpack_boxes
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.tasks.objective import AttackObjective, detection_objective
from medsec.tasks.segmentation import metric_slug
from medsec.utils.outputs import OutputWriter


def box_columns(box: Sequence[float]) -> dict[str, float]:
    """A box as table columns: 2D, COCO's ``x, y, w, h`` (x the column); 3D, ``min_0 .. max_2``
    along the array axes."""
    box = [round(float(v), 3) for v in box]
    dims = len(box) // 2
    if dims == 2:
        return {"x": box[1], "y": box[0], "w": round(box[3] - box[1], 3), "h": round(box[2] - box[0], 3)}
    return {f"{end}_{axis}": box[k * dims + axis] for k, end in enumerate(("min", "max")) for axis in range(dims)}


class DetectionTask(BaseTask):
    """Find and box lesions of ``class_names``.

    The batch's ``label`` holds each image's boxes packed (:mod:`medsec.data.detection`); the
    network is a :class:`~medsec.models.detectors.Detector` (its own losses, summed, are the
    training loss). Logs ``train/loss`` (and each part, ``train/loss_<part>``), and for ``val``
    and ``test``: ``map`` (COCO mAP, IoU 0.5:0.95), ``map_50``, ``map_75``, ``mar_100``,
    ``ap_<class>``, ``ap50_<class>``, ``froc_<rate>`` (sensitivity at 0.05 ... 8 false positives
    per image, IoU 0.5), ``froc_mean``, ``froc_chestx_det10``, ``froc_cpm`` and ``mean_iou``
    (:class:`~medsec.analysis.detection_metrics.DetectionMetrics`). After testing,
    :meth:`save_test_outputs` writes ``detections.json`` (COCO results), ``detections.csv``,
    ``plots/froc.png`` and ``overlays/<image>.png`` for the first images. Under DDP the metrics
    cover every rank's images, each once; only rank zero's test images are written out.

    Args:
        model: the ``model`` config; the task adds ``num_classes``, ``in_channels``, ``spatial_dims``.
        num_classes, class_names, in_channels, spatial_dims: from the data module.
        optimizer, scheduler: ``_partial_`` configs.
        num_overlays: test images drawn with their boxes.
        overlay_min_score: detections drawn on the overlays score at least this.
        multilabel, class_counts: given by the data module for every task; not used here.

    Judged by ``val/map_50`` (max). Attacked through the detector's own loss (a vanishing
    attack: ascending it suppresses true detections); scored by mAP@0.5.
    """

    monitor = "val/map_50"
    mode = "max"

    def __init__(
        self,
        model: Mapping[str, Any],
        num_classes: int,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        in_channels: int = 1,
        spatial_dims: int = 2,
        num_overlays: int = 4,
        overlay_min_score: float = 0.3,
        multilabel: bool = False,
        class_counts: Sequence[int] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"detection needs at least one class, got {num_classes}")
        self.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.slugs = [metric_slug(n) for n in self.class_names]
        if len(set(self.slugs)) != len(self.slugs) or not all(self.slugs):
            raise ConfigError(f"class names {self.class_names} do not give distinct metric names {self.slugs}")
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler)
        self.test_rows: list[dict[str, Any]] = []

    def configure_models(self) -> None:
        hp = self.hparams
        self.net = self.build_net(num_classes=hp.num_classes, in_channels=hp.in_channels, spatial_dims=hp.spatial_dims)

    def configure_losses(self) -> None:
        """The detector brings its own losses (classification, box regression, objectness)."""

    def configure_metrics(self) -> None:
        self.val_metrics = DetectionMetrics(self.slugs, self.hparams.spatial_dims)
        self.test_metrics = DetectionMetrics(self.slugs, self.hparams.spatial_dims)

    # ---- steps ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes``, ``scores``, ``labels``."""
        return self.net(images)

    def detection_loss(self, images: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the detector's losses on ``images`` with packed boxes, and the parts."""
        parts = self.net.losses(images, unpack_boxes(packed))
        return torch.stack(list(parts.values())).sum(), parts

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.detection_loss(batch["image"], batch["label"])
        size = len(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{name}": value.detach() for name, value in parts.items()}, on_step=False,
                      on_epoch=True, batch_size=size)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], metrics: DetectionMetrics) -> list[dict[str, torch.Tensor]]:
        detections = self(batch["image"])
        metrics.update(detections, unpack_boxes(batch["label"]), batch.get("id"))
        return detections

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        detections = self._evaluate(batch, self.test_metrics)
        for i, (case, found, truth) in enumerate(zip(batch["id"], detections, unpack_boxes(batch["label"]))):
            row = {"id": case, **{k: v.detach().cpu().numpy() for k, v in found.items()},
                   "truth": {k: v.cpu().numpy() for k, v in truth.items()}}
            if len(self.test_rows) < self.hparams.num_overlays:
                row["image"] = batch["image"][i, :1].float().cpu().numpy()
            self.test_rows.append(row)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self(batch["image"])

    # ---- epoch ends ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_epoch_metrics(self) -> dict[str, float]:
        values = self.val_metrics.synced().compute()
        self.val_metrics.reset()
        return {f"val/{k}": v for k, v in values.items()}

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self.test_rows = []

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self.test_metrics.synced()  # every rank's images (the FROC plot needs them too)
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()})
        self.test_rows = self.gather_rows(self.test_rows, key=lambda row: row["id"])

    # ---- outputs -------------------------------------------------------------------------
    def detection_rows(self) -> list[dict[str, Any]]:
        """The last test's detections, one row per box: ``image``, ``class``, ``category_id``,
        ``score`` and the box (:func:`box_columns`)."""
        return [{"image": case["id"], "class": self.class_names[int(label)], "category_id": int(label),
                 "score": round(float(score), 6), **box_columns(box)}
                for case in self.test_rows for box, score, label in zip(case["boxes"], case["scores"], case["labels"])]

    def save_test_outputs(self, out_dir: str | Path, writer: OutputWriter) -> None:
        """``detections.json`` (COCO results: ``image_id``, ``category_id``, ``bbox``, ``score``;
        3D: ``box`` as array-axis corners), ``detections.csv``, ``plots/froc.png`` and
        ``overlays/<image>.png``, all through ``writer``."""
        from medsec.viz.detection import boxes_png, froc_png

        rows = self.detection_rows()
        coco = [{"image_id": r["image"], "category_id": r["category_id"], "category": r["class"], "score": r["score"],
                 **({"bbox": [r["x"], r["y"], r["w"], r["h"]]} if "x" in r else
                    {"box": [v for k, v in r.items() if k.startswith(("min_", "max_"))]})} for r in rows]
        writer.write_json("detections.json", {"detections": coco, "categories": self.class_names})
        header = ["image", "class", "category_id", "score", *box_columns(np.zeros(2 * self.hparams.spatial_dims))]
        writer.write_table("detections", header, [list(row.values()) for row in rows])
        writer.write("plots/froc.png", froc_png(self.test_metrics.froc, "test FROC (IoU 0.5)"))
        for case in self.test_rows:
            if "image" in case:
                png = boxes_png(case["image"], case["truth"], case, self.class_names, case["id"],
                                self.hparams.overlay_min_score)
                writer.write(f"overlays/{case['id']}.png", png)

    # ---- contract ------------------------------------------------------------------------
    def attack_objective(self) -> AttackObjective:
        return detection_objective(self, int(self.hparams.num_classes))
