"""How to attack and score each kind of task: logits, the loss an attack ascends, the clean/adversarial
metric and what counts as a successful attack. Attacks act in [0, 1] pixel space; medsec networks
normalise internally, so epsilon is in pixel units."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torchmetrics.functional.classification import multilabel_auroc

from medsec.errors import ConfigError

UNKNOWN = -1


class TaskAdapter(nn.Module):
    """Wraps a trained task as ``logits = adapter(images)`` plus the pieces attacks and reports need.

    Subclasses say which ``kind`` of model they serve: ``multiclass``, ``multilabel`` or
    ``segmentation``.
    """

    kind = "multiclass"
    metric_name = "acc"

    def __init__(self, task: nn.Module, freeze: bool = True) -> None:
        super().__init__()
        self.task = task
        if freeze:  # evaluation: fixed weights, no gradients for them
            self.eval()  # the adapter too: torchattacks restores the mode it finds on the adapter
            task.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task(images)

    @property
    def num_classes(self) -> int:
        return int(self.task.hparams["num_classes"])

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss an untargeted attack increases (mean over the batch)."""
        return F.cross_entropy(logits, target)

    def metric(self, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        """The task's headline metric over all batches (accuracy here)."""
        return float((torch.cat(logits).argmax(1) == torch.cat(targets)).float().mean())

    def success(self, clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                attack_target: torch.Tensor | None = None) -> torch.Tensor:
        """Per image: did the attack succeed? Untargeted: a correct prediction became wrong
        (``nan`` where the clean prediction was already wrong); targeted: the target class was reached."""
        if attack_target is not None:
            return (adversarial.argmax(1) == attack_target).float()
        correct = clean.argmax(1) == target
        flipped = (adversarial.argmax(1) != target).float()
        return torch.where(correct, flipped, torch.full_like(flipped, float("nan")))


class MultilabelAdapter(TaskAdapter):
    """CheXNet-style models: masked BCE per finding; macro AUROC; success = a finding's decision
    (at 0.5) flipped."""

    kind = "multilabel"
    metric_name = "auroc"

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = target != UNKNOWN
        per_item = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0).float(), reduction="none")
        return (per_item * known).sum() / known.sum().clamp(min=1)

    def metric(self, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        probs, target = torch.sigmoid(torch.cat(logits)), torch.cat(targets).long()
        per_class = multilabel_auroc(probs, target, num_labels=probs.shape[1], average=None, ignore_index=UNKNOWN)
        defined = [(target[:, c] == 1).any() and (target[:, c] == 0).any() for c in range(probs.shape[1])]
        values = per_class[torch.as_tensor(defined)]
        return float(values.mean()) if len(values) else float("nan")

    def success(self, clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                attack_target: torch.Tensor | None = None) -> torch.Tensor:
        known = (target != UNKNOWN).float()
        flipped = ((clean > 0) != (adversarial > 0)).float() * known
        return flipped.sum(1) / known.sum(1).clamp(min=1)


class SegmentationAdapter(TaskAdapter):
    """Segmenters: logits by the task's sliding-window inference (differentiable), its Dice+CE loss,
    mean foreground Dice; success = an image's Dice at least halved."""

    kind = "segmentation"
    metric_name = "dice"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.infer(images)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task.loss_fn(logits, target)

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = logits.shape[1]
        prediction = one_hot(logits.argmax(1, keepdim=True), channels)
        per_class = compute_dice(prediction, one_hot(target, channels), include_background=False, ignore_empty=True)
        return torch.nanmean(per_class, dim=1)

    def metric(self, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        return float(torch.nanmean(torch.cat([self._dice(l, t) for l, t in zip(logits, targets)])))

    def success(self, clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                attack_target: torch.Tensor | None = None) -> torch.Tensor:
        return (self._dice(adversarial, target) <= 0.5 * self._dice(clean, target)).float()


def adapter_for(task: Any, freeze: bool = True) -> TaskAdapter:
    """The adapter for a task (classification, multi-label or segmentation); ``freeze`` puts it in
    evaluation mode without weight gradients (off for adversarial training)."""
    from medsec.tasks.segmentation import SegmentationTask

    if isinstance(task, SegmentationTask):
        return SegmentationAdapter(task, freeze=freeze)
    hparams = getattr(task, "hparams", {})
    if "num_classes" not in hparams:
        raise ConfigError(f"{type(task).__name__} cannot be attacked: it is not a classifier or segmenter")
    return (MultilabelAdapter if hparams.get("multilabel") else TaskAdapter)(task, freeze=freeze)
