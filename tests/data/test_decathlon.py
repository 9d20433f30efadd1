"""DecathlonSource on tiny fake Decathlon folders: splits, folds, label names, bad cases named."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsec.data.sources.base import SPLITS
from medsec.data.sources.decathlon import DecathlonSource
from medsec.errors import DataError
from tests.data.fakes import write_decathlon


def ids(data, split: str) -> list[str]:
    return [r["id"] for r in data.splits[split]]


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "task", cases=20)
    data = DecathlonSource(root, fractions=(0.6, 0.2, 0.2), seed=3).load()
    assert data.class_names == ["Anterior", "Posterior"]
    assert data.spatial_dims == 3 and data.from_files
    every = [i for s in SPLITS for i in ids(data, s)]
    assert sorted(every) == [f"case_{i:03d}" for i in range(20)]  # disjoint and complete
    assert [len(data.splits[s]) for s in SPLITS] == [12, 4, 4]
    record = data.splits["train"][0]
    assert Path(record["image"]).is_file() and Path(record["mask"]).name == f"{record['id']}.nii.gz"
    again = DecathlonSource(root, fractions=(0.6, 0.2, 0.2), seed=3).load()
    other = DecathlonSource(root, fractions=(0.6, 0.2, 0.2), seed=4).load()
    assert ids(again, "test") == ids(data, "test")
    assert ids(other, "test") != ids(data, "test")


def test_folds_partition_the_cases(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "task", cases=10)
    tests = []
    for fold in range(5):
        data = DecathlonSource(root, fold=fold, num_folds=5, fractions=(0.75, 0.25, 0.0)).load()
        assert not set(ids(data, "test")) & (set(ids(data, "train")) | set(ids(data, "val")))
        assert len(data.splits["test"]) == 2 and len(data.splits["val"]) == 2
        tests += ids(data, "test")
    assert sorted(tests) == [f"case_{i:03d}" for i in range(10)]  # each case is tested exactly once
    with pytest.raises(DataError, match="fold must be in"):
        DecathlonSource(root, fold=5, num_folds=5).load()


def test_max_cases(tmp_path: Path) -> None:
    data = DecathlonSource(write_decathlon(tmp_path / "task", cases=10), max_cases=6).load()
    assert sum(len(data.splits[s]) for s in SPLITS) == 6


def test_missing_files_are_listed(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "task", cases=6)
    (root / "imagesTr" / "case_002.nii.gz").unlink()
    (root / "labelsTr" / "case_004.nii.gz").unlink()
    with pytest.raises(DataError, match=r"2 missing file\(s\): case_002: .*imagesTr/case_002.nii.gz; case_004: "):
        DecathlonSource(root).load()


def _replace_label(root: Path, case: str, label: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(label, np.eye(4) if affine is None else affine), root / "labelsTr" / f"{case}.nii.gz")


@pytest.mark.parametrize(("problem", "message"), [
    ("shape", r"case case_001 .*label shape \(12, 16, 7\) differs from image shape \(12, 16, 8\)"),
    ("affine", r"case case_001 .*label affine differs from the image affine"),
    ("values", r"case case_001 .*label values \[7\] are not among the declared labels 0..2"),
])
def test_bad_cases_are_named(tmp_path: Path, problem: str, message: str) -> None:
    root = write_decathlon(tmp_path / "task", cases=6)
    label = np.zeros((12, 16, 8), dtype=np.uint8)
    if problem == "shape":
        _replace_label(root, "case_001", label[..., :7])
    elif problem == "affine":
        _replace_label(root, "case_001", label, np.diag([2.0, 1.0, 1.0, 1.0]))
    else:
        label[0, 0, 0] = 7
        _replace_label(root, "case_001", label)
    with pytest.raises(DataError, match=message):
        DecathlonSource(root).load()
    DecathlonSource(root, validate=False).load()  # the check is what found it


def test_bad_dataset_json_is_named(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "task", cases=4, labels={"0": "background", "2": "x"})
    with pytest.raises(DataError, match=r"dataset.json: 'labels' must number 0 \(background\) to K"):
        DecathlonSource(root).load()
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .*dataset.json"):
        DecathlonSource(root).load()
    with pytest.raises(DataError, match="dataset file not found"):
        DecathlonSource(tmp_path / "nowhere").load()


def test_pipeline_names_a_case_whose_mask_does_not_fit(tmp_path: Path) -> None:
    """Records that bypass the source's check (e.g. from an encrypted store) are checked on reading."""
    from medsec.data.segmentation import segmentation_transforms

    transform = segmentation_transforms(train=False, reader=None, in_channels=1, spatial_dims=3)
    image = np.random.default_rng(0).random((1, 8, 8, 8), dtype=np.float32)
    with pytest.raises(RuntimeError) as info:
        transform({"image": image, "mask": np.zeros((1, 8, 8, 4), np.uint8), "id": "case_x"})
    assert "case case_x: mask shape (8, 8, 4) differs from image shape (8, 8, 8)" in str(info.value.__cause__)
    out = transform({"image": image, "mask": np.ones((1, 8, 8, 8), np.uint8), "id": "case_y"})
    assert out["label"].dtype.is_floating_point is False and out["label"].shape == (1, 8, 8, 8)
    assert out["affine"].shape == (4, 4)


def test_pipeline_resamples_crops_and_keeps_the_affine(tmp_path: Path) -> None:
    from medsec.data.segmentation import segmentation_transforms
    from medsec.data.transforms import LoadImageNamed

    root = write_decathlon(tmp_path / "task", cases=1, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    record = {"image": str(root / "imagesTr" / "case_000.nii.gz"), "mask": str(root / "labelsTr" / "case_000.nii.gz"),
              "id": "case_000"}
    reader = LoadImageNamed(["image", "mask"])
    common = {"reader": reader, "in_channels": 1, "spatial_dims": 3, "pixdim": (2.0, 2.0, 2.0), "orientation": "LAS"}
    whole = segmentation_transforms(train=False, **common)(record)
    assert whole["image"].shape == (1, 6, 8, 4) and whole["label"].shape == (1, 6, 8, 4)
    np.testing.assert_allclose(np.diag(whole["affine"].numpy()), [-2.0, 2.0, 2.0, 1.0])
    assert set(whole["label"].unique().tolist()) == {0, 1, 2}
    assert 0.0 <= whole["image"].min() and whole["image"].max() <= 1.0
    crop = segmentation_transforms(train=True, crop_size=[8, 8, 8], **common)(record)
    assert crop["image"].shape == (1, 8, 8, 8) and crop["label"].dtype.is_floating_point is False
    assert type(crop["image"]).__name__ == "Tensor"  # plain tensors in the training loop
