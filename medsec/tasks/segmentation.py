"""Semantic segmentation of 2D images and 3D volumes (MONAI UNet, SegResNet, DynUNet)."""
from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import CumulativeIterationMetric, DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from medsec.errors import ConfigError, DataError
from medsec.tasks.base import BaseTask
from medsec.tasks.objective import AttackObjective, segmentation_objective
from medsec.utils.outputs import OutputWriter

EMPTY_MASK_WARNING = r".*is all 0, this may result in nan/inf distance"


def metric_slug(name: str) -> str:
    """A class name as it appears in metric names: ``"Anterior"`` -> ``anterior``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def voxel_spacing(affine: torch.Tensor, spatial_dims: int, case: str) -> list[float]:
    """The size of a voxel along each of the first ``spatial_dims`` axes, in the affine's world units
    (mm for NIfTI and DICOM): the lengths of the affine's columns, whatever its rotation. Sources
    without geometry (synthetic arrays, PNG/JPEG files) carry the identity affine: 1 mm per pixel."""
    spacing = torch.linalg.vector_norm(affine[:-1, :spatial_dims].double(), dim=0)
    if not (torch.isfinite(spacing).all() and (spacing > 0).all()):
        raise DataError(f"case {case}: its affine gives voxel spacing {spacing.tolist()}; every axis needs a "
                        "positive, finite size")
    return spacing.tolist()


def class_means(metric: CumulativeIterationMetric) -> torch.Tensor:
    """Per-class mean over cases of a per-case metric buffer (all DDP ranks), leaving out the
    cases where it is undefined (NaN or infinite: the class is absent from the ground truth or,
    for distances, from the prediction)."""
    buffer = metric.get_buffer()
    if buffer is None:
        return torch.empty(0)
    buffer = buffer.float()
    return torch.nanmean(torch.where(torch.isfinite(buffer), buffer, torch.nan), dim=0)


class SegmentationTask(BaseTask):
    """Label every pixel/voxel with one of ``class_names`` (foreground) or background.

    Trains on (cropped) images with Dice + cross-entropy; validates and tests on whole images
    with sliding-window inference. Logs ``train/loss``, ``{val,test}/loss``,
    ``{val,test}/dice_<class>``, ``{val,test}/dice_mean``, ``val/dice_mean_best`` and, on test,
    ``test/hd95_mm_<class>`` and ``test/hd95_mm_mean`` (95th-percentile Hausdorff distance in mm, from
    each test image's voxel spacing: :func:`voxel_spacing`).
    Background is excluded from every metric; a case without a class in its ground truth does not
    count towards that class's mean. After testing, :meth:`save_test_outputs` writes one NIfTI
    prediction per case (with the input's affine) and PNG overlays of the first cases. Under DDP,
    only the test cases seen by rank zero are saved; the metrics cover all ranks.

    Args:
        model: the ``model`` config (``net`` plus fine-tuning options); the task adds
            ``spatial_dims``, ``in_channels`` and ``out_channels`` (= classes + background).
        num_classes, class_names, in_channels, spatial_dims: from the data module; mask value k
            is ``class_names[k - 1]``.
        optimizer, scheduler: ``_partial_`` configs.
        roi_size, sw_batch_size, overlap: sliding-window inference settings.
        loss: extra arguments of MONAI's ``DiceCELoss``.
        num_overlays: test cases drawn as overlays.
        multilabel, class_counts: given by the data module for every task; not used here.

    Judged by ``val/dice_mean`` (max). Attacked through its sliding-window logits and Dice+CE loss;
    scored by mean foreground Dice.
    """

    monitor = "val/dice_mean"
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
        roi_size: Sequence[int] | int = 96,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        loss: Mapping[str, Any] | None = None,
        num_overlays: int = 4,
        multilabel: bool = False,
        class_counts: Sequence[int] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"segmentation needs at least one foreground class, got {num_classes}")
        self.class_names = list(class_names) if class_names else [str(k) for k in range(1, num_classes + 1)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {num_classes} foreground classes")
        self.slugs = [metric_slug(n) for n in self.class_names]
        if len(set(self.slugs)) != len(self.slugs) or not all(self.slugs):
            raise ConfigError(f"class names {self.class_names} do not give distinct metric names "
                              f"{self.slugs}")
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler)
        self.test_cases: list[dict[str, Any]] = []

    @property
    def out_channels(self) -> int:
        return self.hparams.num_classes + 1

    def configure_models(self) -> None:
        hp = self.hparams
        self.net = self.build_net(spatial_dims=hp.spatial_dims, in_channels=hp.in_channels, out_channels=self.out_channels)

    def configure_losses(self) -> None:
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, **(self.hparams.loss or {}))

    def configure_metrics(self) -> None:
        self.val_dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.test_dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.test_hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")

    # ---- steps ----------------------------------------------------------------------------
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for whole images, by Gaussian-weighted sliding windows of ``roi_size``."""
        hp = self.hparams
        return sliding_window_inference(image, hp.roi_size, hp.sw_batch_size, self.net, overlap=hp.overlap,
                                        mode="gaussian")

    def sample_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Dice + cross-entropy loss of each image (the Dice of one image, CE averaged over its voxels)."""
        dice = copy.copy(self.loss_fn.dice)
        dice.reduction = "none"
        ce = F.cross_entropy(logits, target[:, 0].long(), weight=self.loss_fn.cross_entropy.weight, reduction="none")
        return (self.loss_fn.lambda_dice * dice(logits, target).flatten(1).mean(1)
                + self.loss_fn.lambda_ce * ce.flatten(1).mean(1))

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(self(batch["image"]), batch["label"], self.loss_fn)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(batch["image"]))
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        """Infer whole images, update the stage's metrics, log the loss; returns the label map."""
        logits = self.infer(batch["image"])
        target = batch["label"]
        prediction = logits.argmax(1, keepdim=True)
        pred_1h, target_1h = one_hot(prediction, self.out_channels), one_hot(target, self.out_channels)
        getattr(self, f"{stage}_dice")(pred_1h, target_1h)
        if stage == "test":
            spacing = [voxel_spacing(affine, self.hparams.spatial_dims, case)
                       for affine, case in zip(batch["affine"], batch["id"])]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=EMPTY_MASK_WARNING)
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                self.test_hd95(pred_1h, target_1h, spacing=spacing)
        self.log(f"{stage}/loss", self.loss_fn(logits, target), on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(target), sync_dist=True)
        return prediction

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        prediction = self._evaluate(batch, "test")
        for i, case in enumerate(batch["id"]):
            kept = {"id": case, "prediction": prediction[i].to(torch.uint8).cpu().numpy(),
                    "affine": batch["affine"][i].cpu().numpy()}
            if len(self.test_cases) < self.hparams.num_overlays:
                kept |= {"image": batch["image"][i, :1].float().cpu().numpy(),
                         "label": batch["label"][i].to(torch.uint8).cpu().numpy()}
            self.test_cases.append(kept)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.infer(batch["image"]).argmax(1, keepdim=True)

    # ---- epoch ends ----------------------------------------------------------------------
    def _per_class(self, metric: CumulativeIterationMetric, name: str) -> dict[str, float]:
        means = class_means(metric)
        metric.reset()
        if means.numel() == 0:
            return {}
        values = {f"{name}_{slug}": float(v) for slug, v in zip(self.slugs, means)}
        return values | {f"{name}_mean": float(torch.nanmean(means))}

    def on_train_start(self) -> None:
        self.val_dice.reset()

    def validation_epoch_metrics(self) -> dict[str, float]:
        values = self._per_class(self.val_dice, "dice")
        values.setdefault("dice_mean", float("nan"))  # no case had a foreground class: undefined
        return {f"val/{k}": v for k, v in values.items()}

    def on_test_epoch_start(self) -> None:
        self.test_cases = []

    def on_test_epoch_end(self) -> None:
        values = self._per_class(self.test_dice, "dice") | self._per_class(self.test_hd95, "hd95_mm")
        self.log_dict({f"test/{k}": v for k, v in values.items()})
        self.test_cases = self.gather_rows(self.test_cases, key=lambda case: case["id"])

    def save_test_outputs(self, out_dir: str | Path, writer: OutputWriter) -> None:
        """Per-case predictions ``predictions/<case>`` (uint8 label maps with the input's affine,
        stored by the writer as NIfTI) and ``overlays/<case>.png`` for the first cases, all through
        ``writer`` (sealed when the run encrypts its outputs)."""
        from medsec.viz.segmentation import overlay_png

        for case in self.test_cases:
            writer.write_label_map(f"predictions/{case['id']}", case["prediction"][0], case["affine"])
            if "image" in case:
                png = overlay_png(case["image"], case["label"], case["prediction"], self.class_names,
                                  case["id"])
                writer.write(f"overlays/{case['id']}.png", png)

    # ---- contract ------------------------------------------------------------------------
    def attack_objective(self) -> AttackObjective:
        return segmentation_objective(self.infer, self.loss_fn, int(self.hparams.num_classes))
