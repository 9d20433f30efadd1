"""MedMNIST v2/v3 2D data sets from their official ``.npz`` files (downloaded when missing)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import medmnist
import numpy as np

from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.errors import DataError


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read the ``{split}_images`` / ``{split}_labels`` arrays of a MedMNIST file."""
    keys = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in keys if key in npz.files}
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as err:
        # a pickle is a ValueError, a bare .npy array a TypeError (no context manager), a broken zip the rest
        raise DataError(f"cannot read MedMNIST file {path} (not a valid .npz): {err}") from err
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise DataError(f"MedMNIST file {path} lacks key(s) {missing}")
    return arrays


def _channel_first(images: np.ndarray, split: str, path: Path) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] == 3:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"{split}_images in {path} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")


def _flat_labels(labels: np.ndarray, split: str, path: Path) -> np.ndarray:
    """(N,) or (N, 1) -> (N,) class indices; (N, C>1) stays a multi-label matrix."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        return labels[:, 0]
    if labels.ndim in (1, 2):
        return labels
    raise DataError(f"{split}_labels in {path} has shape {labels.shape}; expected (N,), (N, 1) or (N, C)")


class MedMNISTSource(DataSource):
    """One MedMNIST 2D data set with its official train/val/test split.

    Args:
        flag: the MedMNIST name, e.g. ``pneumoniamnist``, ``chestmnist`` (multi-label).
        root: folder holding ``{flag}.npz`` (``{flag}_{size}.npz`` for size != 28); defaults to
            ``~/.medmnist`` (where the ``medmnist`` package keeps its files).
        file: an explicit ``.npz`` path (overrides ``root``/``size`` for finding the file).
        size: image edge length of the release (28, 64, 128, 224).
        download: fetch the file with the ``medmnist`` package when it is missing.
    """

    def __init__(
        self,
        flag: str = "pneumoniamnist",
        root: str | None = None,
        file: str | None = None,
        size: int = 28,
        download: bool = True,
    ) -> None:
        self.flag = flag
        self.root = Path(root or "~/.medmnist").expanduser()
        self.size = int(size)
        name = f"{flag}.npz" if self.size == 28 else f"{flag}_{self.size}.npz"
        self.path = Path(file).expanduser() if file else self.root / name
        self.download = download

    @property
    def dataset_id(self) -> str:
        return f"medmnist-{self.flag}-{self.size}"

    def _fetch(self) -> None:
        """Download the file with the ``medmnist`` package, or raise a DataError saying why not."""
        if not self.download:
            raise DataError(f"MedMNIST file not found: {self.path} (download=False)")
        if self.flag not in medmnist.INFO:
            raise DataError(
                f"MedMNIST file not found: {self.path}, and '{self.flag}' is an unknown MedMNIST flag "
                f"(known: {', '.join(sorted(medmnist.INFO))})"
            )
        dataset_class = getattr(medmnist, medmnist.INFO[self.flag]["python_class"])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            dataset_class(split="train", download=True, root=str(self.root), size=self.size)
        except Exception as err:  # network, disk, bad size: all mean "no file"
            raise DataError(
                f"MedMNIST file not found: {self.path}, and the download failed: {type(err).__name__}: {err}"
            ) from err
        if not self.path.exists():
            raise DataError(f"MedMNIST file not found: {self.path} (the download wrote no such file)")

    def _class_names(self, labels: dict[str, np.ndarray]) -> list[str]:
        """Names from ``medmnist.INFO`` for a known flag, else the label indices as strings."""
        if self.flag in medmnist.INFO:
            names = medmnist.INFO[self.flag]["label"]
            return [names[key] for key in sorted(names, key=int)]
        train = labels["train"]
        if train.ndim == 2:
            return [str(i) for i in range(train.shape[1])]
        return [str(i) for i in range(int(max(split.max(initial=0) for split in labels.values())) + 1)]

    def load(self) -> SourceData:
        if not self.path.exists():
            self._fetch()
        arrays = _npz_arrays(self.path)
        images = {s: _channel_first(arrays[f"{s}_images"], s, self.path) for s in SPLITS}
        labels = {s: _flat_labels(arrays[f"{s}_labels"], s, self.path) for s in SPLITS}
        class_names = self._class_names(labels)
        multilabel = labels["train"].ndim == 2
        splits = {s: self._records(s, images[s], labels[s], len(class_names), multilabel) for s in SPLITS}
        return SourceData(
            splits=splits,
            class_names=class_names,
            multilabel=multilabel,
            info={"source": "medmnist", "file": str(self.path)},
        )

    def _records(
        self, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int, multilabel: bool
    ) -> list[Record]:
        """Check one split's labels against the classes and pair them with the images."""
        where = f"{self.flag} split '{split}' ({self.path})"
        if len(images) != len(labels):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
        if multilabel:
            if labels.ndim != 2 or labels.shape[1] != num_classes:
                raise DataError(f"{where}: labels have shape {labels.shape}; expected (N, {num_classes})")
            targets = [row.astype(np.float32) for row in labels]
        else:
            if labels.ndim != 1:
                raise DataError(f"{where}: labels have shape {labels.shape}; expected (N,) or (N, 1)")
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if bad.size:
                raise DataError(
                    f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside [0, {num_classes})"
                )
            targets = [int(label) for label in labels]
        return [
            {"image": image, "label": target, "id": f"{self.flag}-{split}-{i}"}
            for i, (image, target) in enumerate(zip(images, targets))
        ]
