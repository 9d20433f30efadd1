"""FolderSource (class folders and CSV) and reading every supported format through LoadImageNamed."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from medsec.data.sources import FolderSource
from medsec.data.transforms import LoadImageNamed, classification_transforms
from medsec.errors import DataError

from .fakes import make_class_folders, write_csv, write_dicom, write_nifti, write_png

WRITERS: dict[str, Callable[[Path], Path]] = {
    "png": write_png,
    "jpg": write_png,
    "rgb.png": lambda path: write_png(path, rgb=True),
    "8bit.dcm": lambda path: write_dicom(path, bits=8),
    "16bit.dcm": lambda path: write_dicom(path, bits=16),
    "nii": write_nifti,
    "nii.gz": write_nifti,
}


def read(path: Path, pipeline: bool) -> torch.Tensor:
    """Read one file with LoadImageNamed alone or with the evaluation pipeline."""
    transform = (
        classification_transforms(train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=2, image_size=32)
        if pipeline
        else LoadImageNamed("image")
    )
    return transform({"image": str(path), "label": 0})["image"]


@pytest.mark.parametrize("kind", WRITERS)
def test_every_format_through_pipeline(tmp_path: Path, kind: str) -> None:
    path = WRITERS[kind](tmp_path / f"image.{kind}")
    image = read(path, pipeline=True)
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > image.min()


@pytest.mark.parametrize("kind", list(WRITERS))
def test_orientation_matches_the_pixel_array(tmp_path: Path, kind: str) -> None:
    """The fakes are horizontal ramps: brightness must grow along the last axis."""
    image = read(WRITERS[kind](tmp_path / f"image.{kind}"), pipeline=False)
    assert image.shape[-2:] == (20, 20)
    assert image[0, 0, -1] > image[0, 0, 0] and image[0, -1, 0] == image[0, 0, 0]


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    path = write_png(tmp_path / "broken.png", size=64)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="cannot read image file") as err:
        read(path, pipeline=False)
    assert str(path) in str(err.value)


def test_class_folders(tmp_path: Path) -> None:
    make_class_folders(tmp_path)
    data = FolderSource(str(tmp_path)).load()
    assert data.class_names == ["normal", "pneumonia", "zz_dicom"]  # "empty" holds no images
    assert data.from_files and not data.multilabel and data.spatial_dims == 2
    records = [r for split in data.splits.values() for r in split]
    assert len(records) == 22 and len({r["id"] for r in records}) == 22
    by_id = {r["id"]: r for r in records}
    assert by_id["normal/n0.png"]["label"] == 0 and by_id["pneumonia/sub/p3.jpg"]["label"] == 1
    assert by_id["zz_dicom/v0.nii.gz"]["label"] == 2 and Path(by_id["zz_dicom/d0.dcm"]["image"]).is_file()
    again = FolderSource(str(tmp_path)).load()
    assert [r["id"] for r in again.splits["test"]] == [r["id"] for r in data.splits["test"]]


def test_class_folders_with_given_names(tmp_path: Path) -> None:
    make_class_folders(tmp_path)
    data = FolderSource(str(tmp_path), class_names=["pneumonia", "normal"], fractions=(0.5, 0.25, 0.25)).load()
    assert data.class_names == ["pneumonia", "normal"]
    assert sum(len(split) for split in data.splits.values()) == 20
    with pytest.raises(DataError, match=f"in folder {tmp_path / 'empty'}"):
        FolderSource(str(tmp_path), class_names=["normal", "empty"]).load()


def test_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"not found: {tmp_path / 'absent'}"):
        FolderSource(str(tmp_path / "absent")).load()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"no class folders with images .* in {tmp_path}"):
        FolderSource(str(tmp_path)).load()


def make_csv_data(root: Path, rows: list[tuple[str, str, str]], header=("image", "label", "split")) -> Path:
    """One PNG per row (unless the path is marked 'missing') and the CSV ``root/labels.csv``."""
    for image, *_ in rows:
        if "missing" not in image:
            write_png(root / image, size=8)
    return write_csv(root / "labels.csv", header, [row[: len(header)] for row in rows])


SPLIT_ROWS = [
    ("img/a.png", "pneumonia", "train"),
    ("img/b.png", "normal", "train"),
    ("img/c.png", "normal", "val"),
    ("img/d.png", "pneumonia", "Test"),
]


def test_csv_with_split_column(tmp_path: Path) -> None:
    make_csv_data(tmp_path, SPLIT_ROWS)
    data = FolderSource(str(tmp_path), csv="labels.csv").load()
    assert data.class_names == ["normal", "pneumonia"]
    assert [(r["id"], r["label"]) for r in data.splits["train"]] == [("img/a.png", 1), ("img/b.png", 0)]
    assert [r["id"] for r in data.splits["test"]] == ["img/d.png"]
    assert data.splits["val"][0]["image"] == str(tmp_path / "img" / "c.png")


def test_csv_integer_labels_absolute_paths_random_split(tmp_path: Path) -> None:
    rows = [(str(tmp_path / f"img/{i}.png"), str(i % 3), "") for i in range(20)]
    csv = make_csv_data(tmp_path / "data", rows, header=("path", "target"))
    data = FolderSource(str(tmp_path), csv=str(csv), image_column="path", label_column="target").load()
    assert data.class_names == ["0", "1", "2"]
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    named = FolderSource(
        str(tmp_path), csv=str(csv), image_column="path", label_column="target", class_names=["a", "b", "c"]
    ).load()
    assert {r["id"]: r["label"] for s in named.splits.values() for r in s}[rows[5][0]] == 2


def test_csv_multilabel(tmp_path: Path) -> None:
    rows = [
        ("a.png", "mass|nodule", "train"),
        ("b.png", "", "val"),
        ("c.png", "effusion", "test"),
    ]
    make_csv_data(tmp_path, rows)
    data = FolderSource(str(tmp_path), csv="labels.csv", multilabel=True).load()
    assert data.multilabel and data.class_names == ["effusion", "mass", "nodule"]
    assert data.splits["train"][0]["label"].tolist() == [0.0, 1.0, 1.0]
    assert data.splits["val"][0]["label"].dtype == np.float32 and not data.splits["val"][0]["label"].any()


def test_csv_missing_columns(tmp_path: Path) -> None:
    csv = make_csv_data(tmp_path, SPLIT_ROWS, header=("file", "label"))
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image'\]") as err:
        FolderSource(str(tmp_path), csv="labels.csv").load()
    assert str(csv) in str(err.value)


def test_csv_label_not_in_class_names(tmp_path: Path) -> None:
    make_csv_data(tmp_path, SPLIT_ROWS)
    with pytest.raises(DataError, match="line 3: label 'normal' in column 'label' is not one of"):
        FolderSource(str(tmp_path), csv="labels.csv", class_names=["pneumonia"]).load()


def test_csv_empty_label(tmp_path: Path) -> None:
    make_csv_data(tmp_path, [*SPLIT_ROWS, ("img/e.png", " ", "train")])
    with pytest.raises(DataError, match="line 6: empty label in column 'label'"):
        FolderSource(str(tmp_path), csv="labels.csv").load()


def test_csv_missing_image(tmp_path: Path) -> None:
    csv = make_csv_data(tmp_path, [*SPLIT_ROWS[:2], ("img/missing.png", "normal", "val"), *SPLIT_ROWS[2:]])
    with pytest.raises(DataError, match="line 4, column 'image': image not found") as err:
        FolderSource(str(tmp_path), csv=str(csv)).load()
    assert str(tmp_path / "img" / "missing.png") in str(err.value)


def test_csv_bad_split_value(tmp_path: Path) -> None:
    make_csv_data(tmp_path, [*SPLIT_ROWS, ("img/e.png", "normal", "holdout")])
    with pytest.raises(DataError, match="line 6: split 'holdout' in column 'split'"):
        FolderSource(str(tmp_path), csv="labels.csv").load()


def test_csv_empty_split(tmp_path: Path) -> None:
    make_csv_data(tmp_path, [row for row in SPLIT_ROWS if row[2] != "val"])
    with pytest.raises(DataError, match="split 'val' is empty"):
        FolderSource(str(tmp_path), csv="labels.csv").load()


def test_missing_csv_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"label CSV not found: {tmp_path / 'nope.csv'}"):
        FolderSource(str(tmp_path), csv="nope.csv").load()
    with pytest.raises(DataError, match="multilabel data needs a CSV"):
        FolderSource(str(tmp_path), multilabel=True)
    with pytest.raises(DataError, match="spatial_dims"):
        FolderSource(str(tmp_path), spatial_dims=4)
