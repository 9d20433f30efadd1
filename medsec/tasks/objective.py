"""What an adversarial attack on a task ascends and how it is scored: the task's *attack objective*.

A task that can be attacked returns one from :meth:`~medsec.tasks.base.BaseTask.attack_objective`;
:func:`medsec.analysis.attacks.adapters.adapter_for` wraps it for the attacks, so the attack code
never asks which task it holds. Attacks act in [0, 1] pixel space (medsec networks normalise
internally). The standard objectives are built by :func:`multiclass_objective`,
:func:`multilabel_objective`, :func:`segmentation_objective` and :func:`detection_objective`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torchmetrics.functional.classification import multilabel_auroc

from medsec.tasks.multilabel import UNKNOWN, label_counts, macro_auroc, masked_bce

if TYPE_CHECKING:
    from medsec.tasks.detection import DetectionTask

Kind = Literal["multiclass", "multilabel", "segmentation", "detection"]
Logits = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], float]
Success = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class AttackObjective:
    """How to attack and score one task.

    Attributes:
        kind: ``multiclass`` (class logits ``(N, C)``, every attack, targeted too),
            ``multilabel`` (one logit per finding), ``segmentation`` (logits ``(N, C, *spatial)``) or
            ``detection`` (the "logits" are the images themselves; the loss and metric run the
            detector); attacks that need class logits or targets check it.
        metric_name: what :attr:`metric` measures (``acc``, ``auroc``, ``dice``).
        num_classes: classes a targeted attack may aim at.
        logits: images in [0, 1] to logits, differentiable.
        loss: ``loss(logits, target)``, the batch mean an untargeted attack increases.
        metric: ``metric(logits per batch, targets per batch)``, the headline score over all batches.
        success: ``success(clean logits, adversarial logits, target, attack target or None)``, per
            image: did the attack succeed (1/0, a fraction, or ``nan`` where it cannot tell)?
    """

    kind: Kind
    metric_name: str
    num_classes: int
    logits: Logits
    loss: Loss
    metric: Metric
    success: Success


# ---- multi-class ------------------------------------------------------------------------------
def accuracy(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    return float((torch.cat(logits).argmax(1) == torch.cat(targets)).float().mean())


def class_flipped(clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                  attack_target: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted: a correct prediction became wrong (``nan`` where the clean prediction was
    already wrong); targeted: the target class was reached."""
    if attack_target is not None:
        return (adversarial.argmax(1) == attack_target).float()
    correct = clean.argmax(1) == target
    flipped = (adversarial.argmax(1) != target).float()
    return torch.where(correct, flipped, torch.full_like(flipped, float("nan")))


def multiclass_objective(logits: Logits, num_classes: int) -> AttackObjective:
    """Cross-entropy (unweighted), accuracy; success = the predicted class changed from right to wrong."""
    return AttackObjective("multiclass", "acc", num_classes, logits, F.cross_entropy, accuracy, class_flipped)


# ---- multi-label ------------------------------------------------------------------------------
def multilabel_macro_auroc(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    probs, target = torch.sigmoid(torch.cat(logits)), torch.cat(targets).long()
    per_class = multilabel_auroc(probs, target, num_labels=probs.shape[1], average=None, ignore_index=UNKNOWN)
    return macro_auroc(per_class, *label_counts(target))


def findings_flipped(clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                     attack_target: torch.Tensor | None = None) -> torch.Tensor:
    """The fraction of an image's assessed findings whose decision (at 0.5) flipped."""
    known = (target != UNKNOWN).float()
    flipped = ((clean > 0) != (adversarial > 0)).float() * known
    return flipped.sum(1) / known.sum(1).clamp(min=1)


def multilabel_objective(logits: Logits, num_classes: int) -> AttackObjective:
    """Masked BCE per finding, macro AUROC; success = the share of findings whose decision flipped."""
    return AttackObjective("multilabel", "auroc", num_classes, logits, masked_bce, multilabel_macro_auroc,
                           findings_flipped)


# ---- segmentation -----------------------------------------------------------------------------
def image_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean foreground Dice per image of the arg-max prediction (classes absent from the ground
    truth left out)."""
    channels = logits.shape[1]
    prediction = one_hot(logits.argmax(1, keepdim=True), channels)
    per_class = compute_dice(prediction, one_hot(target, channels), include_background=False, ignore_empty=True)
    return torch.nanmean(per_class, dim=1)


def mean_dice(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    return float(torch.nanmean(torch.cat([image_dice(l, t) for l, t in zip(logits, targets)])))


def dice_halved(clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                attack_target: torch.Tensor | None = None) -> torch.Tensor:
    """An image's Dice at least halved."""
    return (image_dice(adversarial, target) <= 0.5 * image_dice(clean, target)).float()


def segmentation_objective(logits: Logits, loss: Loss, num_classes: int) -> AttackObjective:
    """The segmenter's own loss, mean foreground Dice; success = an image's Dice at least halved."""
    return AttackObjective("segmentation", "dice", num_classes, logits, loss, mean_dice, dice_halved)


# ---- detection --------------------------------------------------------------------------------
def detection_objective(task: DetectionTask, num_classes: int, min_score: float = 0.5,
                        iou_threshold: float = 0.5) -> AttackObjective:
    """The detector's own training loss (ascending it is a *vanishing* attack: true boxes lose
    their objectness and class scores), mAP@0.5; success = the share of an image's lesions found
    before the attack (a detection scoring ``min_score`` or more at IoU ``iou_threshold``) that
    are no longer found (``nan`` where none was found). The detector needs the boxes, not
    logits, so the "logits" handed to the attack code are the images themselves."""
    from medsec.analysis.detection_metrics import DetectionMetrics, match_image
    from medsec.data.detection import unpack_boxes

    def images(x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return task.detection_loss(x, packed)[0]

    def map_50(batches: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        metrics = DetectionMetrics(task.slugs, int(task.hparams.spatial_dims), iou_threshold)
        with torch.no_grad():
            for x, packed in zip(batches, targets):
                metrics.update(task(x), unpack_boxes(packed))
        return metrics.compute()["map_50"]

    def found(x: torch.Tensor, packed: torch.Tensor) -> list[torch.Tensor]:
        """Per image, which ground-truth boxes a confident detection hits."""
        with torch.no_grad():
            detections = task(x)
        hits = []
        for pred, truth in zip(detections, unpack_boxes(packed)):
            keep = pred["scores"] >= min_score
            swapped = {"boxes": truth["boxes"], "labels": truth["labels"], "scores": torch.ones(len(truth["labels"]))}
            # a ground-truth box is found when it matches a confident detection (roles swapped)
            hits.append(torch.as_tensor(match_image(swapped, {k: pred[k][keep] for k in ("boxes", "labels")},
                                                    iou_threshold)))
        return hits

    def vanished(clean: torch.Tensor, adversarial: torch.Tensor, packed: torch.Tensor,
                 attack_target: torch.Tensor | None = None) -> torch.Tensor:
        before, after = found(clean, packed), found(adversarial, packed)
        return torch.tensor([float((b & ~a).sum() / b.sum()) if b.any() else float("nan")
                             for b, a in zip(before, after)])

    return AttackObjective("detection", "map_50", num_classes, images, loss, map_50, vanished)
