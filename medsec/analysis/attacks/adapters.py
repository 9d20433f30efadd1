"""A trained task as the attacks see it: ``logits = adapter(images)`` plus the loss an attack ascends,
the clean/adversarial metric and what counts as a successful attack, all from the task's own
:meth:`~medsec.tasks.base.BaseTask.attack_objective`. Attacks act in [0, 1] pixel space; medsec
networks normalise internally, so epsilon is in pixel units."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.tasks.objective import AttackObjective, Kind


class TaskAdapter(nn.Module):
    """Wraps a trained task and its :class:`~medsec.tasks.objective.AttackObjective`.

    ``kind`` (``multiclass``, ``multilabel`` or ``segmentation``) tells attacks what the logits are.
    """

    def __init__(self, task: BaseTask, objective: AttackObjective, freeze: bool = True) -> None:
        super().__init__()
        self.task = task
        self.objective = objective
        if freeze:  # evaluation: fixed weights, no gradients for them
            self.eval()  # the adapter too: torchattacks restores the mode it finds on the adapter
            task.requires_grad_(False)

    @property
    def kind(self) -> Kind:
        return self.objective.kind

    @property
    def metric_name(self) -> str:
        return self.objective.metric_name

    @property
    def num_classes(self) -> int:
        return self.objective.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.objective.logits(images)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss an untargeted attack increases (mean over the batch)."""
        return self.objective.loss(logits, target)

    def metric(self, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        """The task's headline metric over all batches."""
        return self.objective.metric(logits, targets)

    def success(self, clean: torch.Tensor, adversarial: torch.Tensor, target: torch.Tensor,
                attack_target: torch.Tensor | None = None) -> torch.Tensor:
        """Per image: did the attack succeed (``nan`` where that cannot be told)?"""
        return self.objective.success(clean, adversarial, target, attack_target)


def adapter_for(task: BaseTask, freeze: bool = True) -> TaskAdapter:
    """The adapter for any task that declares an attack objective (a ``ConfigError`` naming the
    task otherwise); ``freeze`` puts it in evaluation mode without weight gradients (off for
    adversarial training)."""
    objective = getattr(task, "attack_objective", None)
    if objective is None:
        raise ConfigError(f"{type(task).__name__} cannot be attacked: it is not a medsec task")
    return TaskAdapter(task, objective(), freeze=freeze)
