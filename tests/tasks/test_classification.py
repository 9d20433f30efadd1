"""ClassificationTask pieces: masked multi-label loss, class weights, metric aggregation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsec.errors import ConfigError
from medsec.tasks import ClassificationTask

MODEL = {"net": {"_target_": "medsec.models.small_cnn", "width": 4}}
OPT = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


def make(**kwargs) -> ClassificationTask:
    return ClassificationTask(model=MODEL, optimizer=OPT, **{"num_classes": 3, **kwargs})


def test_unknown_findings_are_masked_in_the_loss() -> None:
    task = make(multilabel=True)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    known = target != -1
    expected = F.binary_cross_entropy_with_logits(logits[known], target[known])
    torch.testing.assert_close(task.loss(logits, target), expected)
    # changing a logit of an unknown finding changes nothing
    logits2 = logits.clone()
    logits2[0, 1] = 40.0
    torch.testing.assert_close(task.loss(logits2, target), expected)


def test_balanced_class_weights_are_inverse_frequency() -> None:
    task = make(class_weights="balanced", class_counts=[100, 50, 25])
    torch.testing.assert_close(task.class_weight, torch.tensor([175 / 300, 175 / 150, 175 / 75]))
    with pytest.raises(ConfigError, match="class_weights has 2 entries for 3 classes"):
        make(class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="balanced needs multi-class data"):
        make(class_weights="balanced", multilabel=True)


def test_macro_auroc_skips_classes_absent_from_the_split() -> None:
    task = make(multilabel=True)
    probs = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.8, 0.3], [0.7, 0.3, 0.9], [0.1, 0.6, 0.4]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, -1]])  # finding 2: no positive
    task.test_metrics.update(probs, target)
    values = task._summarise("test")
    assert values["auroc_0"] == pytest.approx(1.0) and values["auroc_1"] == pytest.approx(1.0)
    assert math.isnan(values["auroc_2"])
    assert values["auroc"] == pytest.approx(1.0)


def test_class_names_must_match_classes() -> None:
    with pytest.raises(ConfigError, match="2 class names for 3 classes"):
        make(class_names=["a", "b"])
    with pytest.raises(ConfigError, match="model.net is missing"):
        ClassificationTask(model={}, optimizer=OPT, num_classes=2)
