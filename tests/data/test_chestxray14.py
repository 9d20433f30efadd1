"""ChestXray14Source: NIH's label file, both image layouts, patient-disjoint splits, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medsec.data.sources import FINDINGS, ChestXray14Source, SourceData
from medsec.data.transforms import LoadImageNamed, classification_transforms
from medsec.errors import DataError

from .fakes import nih_rows, shared_data, write_csv, write_nih


def patients_of(data: SourceData, split: str) -> set[str]:
    return {record["id"].split("_")[0] for record in data.splits[split]}


def assert_patient_disjoint(data: SourceData) -> None:
    train, val, test = (patients_of(data, s) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)


def test_load(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows(patients=10, per_patient=2))
    data = ChestXray14Source(str(tmp_path)).load()
    assert data.multilabel and data.from_files and data.class_names == list(FINDINGS)
    assert sum(len(records) for records in data.splits.values()) == 20
    assert_patient_disjoint(data)
    records = {r["id"]: r for split in data.splits.values() for r in split}
    assert Path(records["00000001_000.png"]["image"]).is_file()
    assert records["00000001_000.png"]["label"].dtype == np.float32
    assert records["00000001_000.png"]["label"].tolist() == [0.0, 1.0] + [0.0] * 12  # Cardiomegaly
    assert np.flatnonzero(records["00000001_001.png"]["label"]).tolist() == [0, 2]  # Atelectasis|Effusion
    assert not records["00000003_001.png"]["label"].any()  # No Finding
    assert data.info["official_split"] is False


def test_views_filter(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows(patients=10, per_patient=2))
    data = ChestXray14Source(str(tmp_path), views=["PA", "LL"]).load()
    assert sum(len(records) for records in data.splits.values()) == 10
    assert all(record["id"].endswith("_000.png") for split in data.splits.values() for record in split)


def test_nih_download_layout_and_explicit_csv(tmp_path: Path) -> None:
    rows = nih_rows(patients=10, per_patient=1)
    csv = write_nih(tmp_path, rows, csv_name="labels.csv")
    for i, (name, *_) in enumerate(rows):
        target = tmp_path / f"images_{i % 2 + 1:03d}" / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp_path / "images" / name, target)
    data = ChestXray14Source(str(tmp_path), csv=str(csv)).load()
    paths = [Path(r["image"]) for split in data.splits.values() for r in split]
    assert len(paths) == 10 and all(p.is_file() and p.parent.name == "images" for p in paths)


def test_official_lists(tmp_path: Path) -> None:
    rows = nih_rows(patients=20, per_patient=2)
    write_nih(tmp_path, rows)
    test_names = [name for name, _, patient, _ in rows if int(patient) > 15]
    (tmp_path / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[0] not in test_names))
    data = ChestXray14Source(str(tmp_path), fractions=(0.7, 0.1, 0.2)).load()
    assert sorted(r["id"] for r in data.splits["test"]) == sorted(test_names)
    assert len(data.splits["train"]) + len(data.splits["val"]) == 30 and data.info["official_split"]
    assert_patient_disjoint(data)


def test_max_images_keeps_whole_patients(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows(patients=30, per_patient=2))
    first = ChestXray14Source(str(tmp_path), max_images=41, seed=1).load()
    again = ChestXray14Source(str(tmp_path), max_images=41, seed=1).load()
    other = ChestXray14Source(str(tmp_path), max_images=41, seed=2).load()
    ids = [r["id"] for split in first.splits.values() for r in split]
    assert len(ids) == 40  # 20 patients x 2 images: a 21st patient would exceed 41
    assert ids == [r["id"] for split in again.splits.values() for r in split]
    assert set(ids) != {r["id"] for split in other.splits.values() for r in split}
    assert_patient_disjoint(first)


def test_record_through_pipeline(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows(patients=10, per_patient=1))
    record = ChestXray14Source(str(tmp_path)).load().splits["train"][0]
    out = classification_transforms(
        train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=2, image_size=32, multilabel=True
    )(record)
    assert out["image"].shape == (1, 32, 32) and out["image"].dtype == torch.float32
    assert out["label"].shape == (14,) and out["label"].dtype == torch.float32


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        ChestXray14Source(str(tmp_path / "absent")).load()
    assert str(tmp_path / "absent") in str(err.value)


def test_no_or_several_csvs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="found no"):
        ChestXray14Source(str(tmp_path)).load()
    write_nih(tmp_path, nih_rows(), csv_name="Data_Entry_2017.csv")
    write_nih(tmp_path, nih_rows(), csv_name="Data_Entry_2017_v2020.csv")
    with pytest.raises(DataError, match="found 2 .*Data_Entry_2017.csv, Data_Entry_2017_v2020.csv"):
        ChestXray14Source(str(tmp_path)).load()


def test_missing_columns(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Patient ID"], [])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['View Position'\]") as err:
        ChestXray14Source(str(tmp_path)).load()
    assert str(csv) in str(err.value)


def test_unknown_finding(tmp_path: Path) -> None:
    rows = nih_rows(patients=5, per_patient=1)
    rows[2] = (rows[2][0], "Mass|Pneumonitis", rows[2][2], "PA")
    csv = write_nih(tmp_path, rows)
    expected = "line 4: unknown finding 'Pneumonitis' in column 'Finding Labels'"
    with pytest.raises(DataError, match=expected) as err:
        ChestXray14Source(str(tmp_path)).load()
    assert str(csv) in str(err.value)


def test_missing_images(tmp_path: Path) -> None:
    rows = nih_rows(patients=10, per_patient=1)
    write_nih(tmp_path, rows)
    for name, *_ in rows[3:6]:
        (tmp_path / "images" / name).unlink()
    with pytest.raises(DataError, match=f"3 of 10 images .* missing .*{rows[3][0]}"):
        ChestXray14Source(str(tmp_path)).load()


def test_no_row_with_view(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows())
    with pytest.raises(DataError, match="no row has 'View Position' in \\['LL'\\]"):
        ChestXray14Source(str(tmp_path), views=["LL"]).load()


def test_empty_split(tmp_path: Path) -> None:
    write_nih(tmp_path, nih_rows(patients=2, per_patient=3))
    with pytest.raises(DataError, match="split 'test' is empty"):
        ChestXray14Source(str(tmp_path)).load()


@pytest.mark.realdata
def test_real_nih_sample() -> None:
    root = shared_data("nih_cxr14_sample")
    data = ChestXray14Source(str(root)).load()
    records = [r for split in data.splits.values() for r in split]
    assert len(records) == 621 and data.num_classes == 14
    assert_patient_disjoint(data)
    positives = np.sum([r["label"] for r in records], axis=0)
    assert positives[FINDINGS.index("Infiltration")] == 123 and positives[FINDINGS.index("Hernia")] == 20
    assert sum(not r["label"].any() for r in records) == 100  # No Finding
    pa_only = ChestXray14Source(str(root), views=["PA"]).load()
    assert sum(len(records) for records in pa_only.splits.values()) == 518
