"""2D slices of Decathlon volumes for denoising (fake folder; the real hippocampus when present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsec.data.datamodule import MedicalDataModule
from medsec.data.sources.decathlon_slices import DecathlonSlicesSource, to_uint8
from medsec.errors import DataError
from tests.data.fakes import shared_data, write_decathlon


def test_labelled_slices_split_by_case(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "task", cases=10, shape=(12, 16, 8))
    data = DecathlonSlicesSource(str(root), axis=2, fractions=(0.6, 0.2, 0.2)).load()
    assert data.spatial_dims == 2 and data.class_names == ["slice"]
    for split, records in data.splits.items():
        assert len(records) == 4 * {"train": 6, "val": 2, "test": 2}[split]  # labels fill z = 2..5
        assert all(r["image"].shape == (1, 12, 16) and r["image"].dtype == np.uint8 for r in records)
    cases = {split: {r["id"].rsplit("-", 1)[0] for r in records} for split, records in data.splits.items()}
    assert not (cases["train"] & cases["test"]) and not (cases["train"] & cases["val"])
    capped = DecathlonSlicesSource(str(root), axis=0, max_slices=3).load()  # 9 labelled slices along x
    per_case = [r["id"].rsplit("-", 1)[0] for r in capped.splits["train"]]
    assert {per_case.count(case) for case in per_case} == {3}


def test_to_uint8_uses_percentiles() -> None:
    volume = np.concatenate([np.linspace(0, 1, 998), [50.0, -50.0]])
    levels = to_uint8(volume)
    assert levels.min() == 0 and levels.max() == 255 and levels[500] == pytest.approx(128, abs=2)


def test_bad_axis_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="decathlon_slices: axis must be 0, 1 or 2, got 3"):
        DecathlonSlicesSource(str(tmp_path), axis=3)


def test_real_hippocampus_slices_batch_at_64() -> None:
    source = DecathlonSlicesSource(str(shared_data("msd_hippocampus")), max_cases=6, max_slices=4,
                                   fractions=(0.5, 0.25, 0.25), validate=False)
    dm = MedicalDataModule(source, batch_size=4, num_workers=0, image_size=64, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
