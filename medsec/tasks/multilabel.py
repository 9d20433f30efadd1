"""Label conventions shared by the classification task and the attacks on it: the value of an
unassessed finding, the loss that masks it, and the macro AUROC over the classes it is defined for."""
from __future__ import annotations

import torch
import torch.nn.functional as F

UNKNOWN = -1
"""Multi-label target value for a finding that was not assessed: masked in loss and metrics."""


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per finding, averaged over the findings that were assessed
    (target ``UNKNOWN`` left out); 0 when none was."""
    known = target != UNKNOWN
    per_item = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0).float(), reduction="none")
    return (per_item * known).sum() / known.sum().clamp(min=1)


def masked_bce_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`masked_bce` of each sample on its own, shape ``(N,)``."""
    known = target != UNKNOWN
    per_item = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0).float(), reduction="none")
    return (per_item * known).flatten(1).sum(1) / known.flatten(1).sum(1).clamp(min=1)


def label_counts(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) per class of multi-label targets ``(N, C)``; ``UNKNOWN`` counts as neither."""
    return (target == 1).sum(0), (target == 0).sum(0)


def macro_auroc(per_class: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Mean of the per-class AUROCs over the classes with both labels (positives and negatives) in
    the split, the only ones an AUROC is defined for; ``nan`` when no class has both."""
    defined = (positives > 0) & (negatives > 0)
    return float(per_class[defined].mean()) if defined.any() else float("nan")


def defined_classes(positives: torch.Tensor, negatives: torch.Tensor) -> list[bool]:
    """Per class: does the split hold both labels (is its AUROC defined)?"""
    return ((positives > 0) & (negatives > 0)).tolist()
