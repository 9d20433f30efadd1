"""ImageMaskSource: image/mask pairs listed by a CSV, through the segmentation pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsec.data.datamodule import MedicalDataModule
from medsec.data.segmentation import segmentation_transforms
from medsec.data.sources.image_masks import ImageMaskSource
from medsec.errors import DataError

from .fakes import write_csv, write_image_masks


def test_pairs_become_segmentation_batches(tmp_path: Path) -> None:
    csv = write_image_masks(tmp_path / "pairs", count=12)
    source = ImageMaskSource(str(csv.parent), csv.name, class_names=["lesion"])
    data = source.load()
    assert {s: len(r) for s, r in data.splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert data.class_names == ["lesion"] and data.from_files and data.class_counts() is None
    datamodule = MedicalDataModule(source, batch_size=4, num_workers=0, augment=False, pipeline=segmentation_transforms)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["label"].shape == (2, 1, 16, 16)
    assert set(torch.unique(batch["label"]).tolist()) == {0, 1}
    assert batch["id"] == ["images/10.png", "images/11.png"]
    # the bright square is the mask's foreground
    assert batch["image"][batch["label"] == 1].mean() > batch["image"][batch["label"] == 0].mean() + 0.3


def test_a_missing_mask_is_named(tmp_path: Path) -> None:
    csv = write_image_masks(tmp_path / "pairs", count=6)
    write_csv(csv, ["image", "mask"], [["images/0.png", "masks/0.png"], ["images/1.png", "masks/nope.png"]])
    with pytest.raises(DataError, match=r"pairs.csv line 3, column 'mask': image not found: .*masks/nope.png"):
        ImageMaskSource(str(csv.parent), csv.name, class_names=["lesion"]).load()
    with pytest.raises(DataError, match="class_names must name the foreground classes"):
        ImageMaskSource(str(csv.parent), csv.name, class_names=[])
