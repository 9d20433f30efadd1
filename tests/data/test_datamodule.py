"""MedicalDataModule: batches, channels, resizing, augmentation, global batch size under DDP."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medsec.data import MedicalDataModule
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import ConfigError


def make(**kwargs) -> MedicalDataModule:
    source = SyntheticSource(num_samples=(40, 12, 12), image_size=16, **kwargs.pop("source", {}))
    return MedicalDataModule(source, **{"batch_size": 8, "num_workers": 0, **kwargs})


@pytest.mark.parametrize(("in_channels", "image_size"), [(1, None), (3, 32)])
def test_batches_are_plain_tensors_in_unit_range(in_channels: int, image_size: int | None) -> None:
    dm = make(in_channels=in_channels, image_size=image_size)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    side = image_size or 16
    assert batch["image"].shape == (8, in_channels, side, side)
    assert type(batch["image"]) is torch.Tensor  # no MetaTensor overhead in the training loop
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_multilabel_targets_are_float() -> None:
    dm = make(source={"multilabel": True, "num_classes": 3})
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (8, 3)
    assert dm.task_info()["class_counts"] is None


def test_validation_is_deterministic_and_training_augmented() -> None:
    dm = make(augment=True)
    dm.setup(None)
    val = dm.datasets["val"]
    torch.testing.assert_close(val[0]["image"], val[0]["image"])
    train = dm.datasets["train"]
    assert any(not torch.equal(train[i]["image"], train[i]["image"]) for i in range(8))


def test_task_info_and_class_counts() -> None:
    dm = make()
    info = dm.task_info()
    assert info["num_classes"] == 2 and info["class_names"][0] == "healthy"
    assert sum(info["class_counts"]) == 40


def test_global_batch_is_split_across_processes() -> None:
    dm = make(batch_size=8)
    dm.trainer = SimpleNamespace(world_size=2)
    assert dm.train_dataloader().batch_size == 4
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ConfigError, match="batch_size=8 is not divisible by the 3 DDP processes"):
        dm.train_dataloader()


def test_eval_batch_size_applies_to_validation_and_test_only() -> None:
    dm = make(batch_size=8, eval_batch_size=2)
    assert dm.train_dataloader().batch_size == 8
    assert dm.val_dataloader().batch_size == 2 and dm.test_dataloader().batch_size == 2
    with pytest.raises(ConfigError, match="eval_batch_size must be positive"):
        make(eval_batch_size=-1)


def test_train_subset_is_a_seeded_choice_of_training_records_only() -> None:
    full, first, again = make(), make(train_subset=10), make(train_subset=10)
    for dm in (full, first, again):
        dm.setup(None)
    ids = [item["id"] for item in first.datasets["train"]]
    assert len(ids) == 10 and ids == [item["id"] for item in again.datasets["train"]]
    assert set(ids) < {item["id"] for item in full.datasets["train"]}
    assert len(first.datasets["val"]) == 12 and len(first.datasets["test"]) == 12
    with pytest.raises(ConfigError, match="data.train_subset=41 exceeds the 40 training records"):
        make(train_subset=41).setup("fit")
    with pytest.raises(ConfigError, match="data.train_subset must be positive"):
        make(train_subset=0)
