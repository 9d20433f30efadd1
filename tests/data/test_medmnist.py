"""MedMNISTSource: npz layouts, the download path (no network) and bad files."""
from __future__ import annotations

from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch

from medsec.data.sources import MedMNISTSource
from medsec.data.transforms import classification_transforms
from medsec.errors import DataError

from .fakes import shared_data, write_npz


@pytest.mark.parametrize("label_shape", ["(N,)", "(N,1)"])
def test_multiclass_grey(tmp_path: Path, label_shape: str) -> None:
    path = write_npz(tmp_path / "pneumoniamnist.npz", label_shape=label_shape)
    data = MedMNISTSource("pneumoniamnist", root=str(tmp_path), download=False).load()
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert data.class_names == ["normal", "pneumonia"] and not data.multilabel and not data.from_files
    record = data.splits["train"][3]
    assert record["image"].shape == (1, 28, 28) and record["image"].dtype == np.uint8
    assert record["label"] == 1 and isinstance(record["label"], int)
    assert record["id"] == "pneumoniamnist-train-3"
    assert data.info == {"source": "medmnist", "file": str(path)}


def test_rgb_and_sized_file_name(tmp_path: Path) -> None:
    write_npz(tmp_path / "dermamnist_64.npz", num_classes=7, rgb=True, size=64)
    data = MedMNISTSource("dermamnist", root=str(tmp_path), size=64, download=False).load()
    assert data.splits["val"][0]["image"].shape == (3, 64, 64)
    assert data.num_classes == 7 and data.class_names[0] == medmnist.INFO["dermamnist"]["label"]["0"]


def test_multilabel(tmp_path: Path) -> None:
    write_npz(tmp_path / "chestmnist.npz", num_classes=14, label_shape="(N,C)")
    data = MedMNISTSource("chestmnist", root=str(tmp_path), download=False).load()
    label = data.splits["test"][0]["label"]
    assert data.multilabel and data.num_classes == 14 and data.class_names[0] == "atelectasis"
    assert label.shape == (14,) and label.dtype == np.float32


def test_unknown_flag_with_explicit_file(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "custom.npz", num_classes=3, label_shape="(N,)")
    data = MedMNISTSource("mymnist", file=str(path), download=False).load()
    assert data.class_names == ["0", "1", "2"]
    assert data.splits["train"][0]["id"] == "mymnist-train-0"


def test_records_through_pipeline(tmp_path: Path) -> None:
    write_npz(tmp_path / "pneumoniamnist.npz")
    record = MedMNISTSource(root=str(tmp_path), download=False).load().splits["train"][0]
    out = classification_transforms(
        train=False, reader=None, in_channels=1, spatial_dims=2, image_size=32
    )(record)
    assert out["image"].shape == (1, 32, 32) and out["image"].dtype == torch.float32
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


@pytest.mark.parametrize("size, name", [(28, "pneumoniamnist.npz"), (64, "pneumoniamnist_64.npz")])
def test_download_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, name: str) -> None:
    root = tmp_path / "not" / "yet"
    calls = []

    class FakeDataset:
        def __init__(self, **kwargs) -> None:
            calls.append(kwargs)
            assert Path(kwargs["root"]).is_dir()  # medmnist refuses a missing root
            write_npz(Path(kwargs["root"]) / name, size=size)

    monkeypatch.setattr(medmnist, "PneumoniaMNIST", FakeDataset)
    data = MedMNISTSource(root=str(root), size=size).load()
    assert calls == [{"split": "train", "download": True, "root": str(root), "size": size}]
    assert data.info["file"] == str(root / name)
    MedMNISTSource(root=str(root), size=size).load()
    assert len(calls) == 1  # present now: no second download


def test_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs) -> None:
        raise RuntimeError("Automatic download failed! no network")

    monkeypatch.setattr(medmnist, "PneumoniaMNIST", offline)
    with pytest.raises(DataError, match="download failed") as err:
        MedMNISTSource(root=str(tmp_path)).load()
    assert str(tmp_path / "pneumoniamnist.npz") in str(err.value) and "no network" in str(err.value)


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        MedMNISTSource(root=str(tmp_path), download=False).load()
    assert str(tmp_path / "pneumoniamnist.npz") in str(err.value)


def test_unknown_flag_without_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'nosuchmnist' is an unknown MedMNIST flag"):
        MedMNISTSource("nosuchmnist", root=str(tmp_path)).load()


def test_missing_key(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "pneumoniamnist.npz", drop="val_labels")
    with pytest.raises(DataError, match="val_labels") as err:
        MedMNISTSource(file=str(path), download=False).load()
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", ["garbage", "truncated", "npy"])
def test_corrupt_file(tmp_path: Path, content: str) -> None:
    good = write_npz(tmp_path / "good.npz").read_bytes()
    path = tmp_path / "pneumoniamnist.npz"
    if content == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif content == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        with path.open("wb") as handle:
            np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match="not a valid .npz") as err:
        MedMNISTSource(file=str(path), download=False).load()
    assert str(path) in str(err.value)


def _edit_npz(path: Path, **arrays: np.ndarray) -> Path:
    with np.load(path) as npz:
        np.savez(path, **{**dict(npz), **arrays})
    return path


def test_length_mismatch(tmp_path: Path) -> None:
    path = _edit_npz(write_npz(tmp_path / "x.npz"), val_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DataError, match="split 'val'.*3 images but 2 labels"):
        MedMNISTSource(file=str(path), download=False).load()


def test_label_out_of_range(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", num_classes=3)  # pneumoniamnist has 2 classes
    with pytest.raises(DataError, match=r"split 'train'.*label 2 at index 2 is outside \[0, 2\)"):
        MedMNISTSource(file=str(path), download=False).load()


def test_bad_image_shape(tmp_path: Path) -> None:
    path = _edit_npz(write_npz(tmp_path / "x.npz"), test_images=np.zeros((3, 28), np.uint8))
    with pytest.raises(DataError, match="test_images"):
        MedMNISTSource(file=str(path), download=False).load()


def test_empty_split(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", counts=(4, 0, 2))
    with pytest.raises(DataError, match="split 'val' is empty"):
        MedMNISTSource(file=str(path), download=False).load()


@pytest.mark.realdata
@pytest.mark.parametrize(
    "flag, counts, test_balance",
    [("pneumoniamnist", (3882, 524, 624), (234, 390)), ("breastmnist", (546, 78, 156), (42, 114))],
)
def test_real_medmnist(flag: str, counts: tuple[int, int, int], test_balance: tuple[int, int]) -> None:
    folder = shared_data(flag)
    data = MedMNISTSource(flag, root=str(folder), download=False).load()
    assert tuple(len(data.splits[s]) for s in ("train", "val", "test")) == counts
    assert np.bincount([r["label"] for r in data.splits["test"]]).tolist() == list(test_balance)
    assert data.splits["train"][0]["image"].shape == (1, 28, 28) and data.num_classes == 2
