"""Labelled image files on disk (PNG, JPEG, DICOM, NIfTI), listed by a CSV or sorted into class folders.

CSV mode: one row per image with its path (relative to the CSV's folder, or absolute), its label
(a class name or a class index; for multi-label, ``|``-separated names, empty for none) and an
optional split (train/val/test). Folder mode: ``root/<class name>/**/<image>``.
Images are only checked to exist here; ``LoadImageNamed`` reads them later.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsec.data.sources.base import (
    SPLITS,
    DataSource,
    Record,
    SourceData,
    read_csv,
    require_path,
    split_by_group,
)
from medsec.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(EXTENSIONS)


def _tokens(value: str, multilabel: bool) -> list[str]:
    """The class names (or indices) in one label cell; none for an empty cell."""
    parts = value.split("|") if multilabel else [value]
    return [part.strip() for part in parts if part.strip()]


def _default_class_names(tokens: Sequence[str]) -> list[str]:
    """Sorted unique labels; all-integer labels are indices, named ``"0" .. str(max)``."""
    unique = set(tokens)
    if unique and all(token.isdigit() for token in unique):
        return [str(i) for i in range(max(int(token) for token in unique) + 1)]
    return sorted(unique)


class FolderSource(DataSource):
    """Image files with labels, from a CSV or from one sub-folder per class.

    Args:
        root: the data folder.
        csv: label file, relative to ``root`` (or absolute); ``None`` for folder mode.
        image_column, label_column: CSV columns with the image path and the label.
        split_column: CSV column with train/val/test; when absent from the CSV the split is random.
        class_names: the classes in index order; default: the sorted labels (CSV) or folder names.
        multilabel: labels are ``|``-separated sets of class names (CSV mode only).
        fractions: train/val/test shares for the random split.
        seed: seeds the random split.
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(
        self,
        root: str,
        csv: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        split_column: str | None = "split",
        class_names: Sequence[str] | None = None,
        multilabel: bool = False,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        spatial_dims: int = 2,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise DataError(f"folder: spatial_dims must be 2 or 3, got {spatial_dims}")
        if multilabel and csv is None:
            raise DataError("folder: multilabel data needs a CSV (csv=...); a class folder holds one class")
        self.root = Path(root).expanduser()
        self.csv = csv
        self.image_column = image_column
        self.label_column = label_column
        self.split_column = split_column
        self.class_names = list(class_names) if class_names is not None else None
        self.multilabel = multilabel
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)
        self.spatial_dims = spatial_dims

    def load(self) -> SourceData:
        require_path(self.root, "image folder")
        if self.csv is None:
            records, class_names = self._from_folders()
            splits = self._random_split(records)
        else:
            splits, class_names = self._from_csv(require_path(self.root / self.csv, "label CSV"))
        return SourceData(
            splits=splits,
            class_names=class_names,
            multilabel=self.multilabel,
            spatial_dims=self.spatial_dims,
            from_files=True,
            info={"source": "folder", "root": str(self.root), "csv": self.csv},
        )

    def _random_split(self, records: list[Record]) -> dict[str, list[Record]]:
        """Seeded random train/val/test split, each record on its own."""
        indices = split_by_group(list(range(len(records))), self.fractions, self.seed)
        return {split: [records[i] for i in idx] for split, idx in indices.items()}

    def _from_folders(self) -> tuple[list[Record], list[str]]:
        """Records from ``root/<class>/**``; class names are the folders holding images."""
        folders = self.class_names or sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        files = {name: sorted(filter(_is_image, (self.root / name).rglob("*"))) for name in folders}
        if self.class_names is None:
            folders = [name for name in folders if files[name]]
        if not folders:
            raise DataError(f"folder: no class folders with images ({'/'.join(EXTENSIONS)}) in {self.root}")
        for name in folders:
            if not files[name]:
                raise DataError(f"folder: no images ({'/'.join(EXTENSIONS)}) in folder {self.root / name}")
        records = [
            {"image": str(path), "label": label, "id": str(path.relative_to(self.root))}
            for label, name in enumerate(folders)
            for path in files[name]
        ]
        return records, folders

    def _from_csv(self, csv: Path) -> tuple[dict[str, list[Record]], list[str]]:
        """Split records from a CSV: the CSV's split when it has a split column, else a random one."""
        frame = read_csv(csv, [self.image_column, self.label_column])
        tokens = [_tokens(value, self.multilabel) for value in frame[self.label_column]]
        class_names = self.class_names or _default_class_names([t for row in tokens for t in row])
        if not class_names:
            raise DataError(f"{csv}: column '{self.label_column}' holds no labels")
        records = [
            {
                "image": self._image_path(csv, row, value),
                "label": self._label(csv, row, row_tokens, class_names),
                "id": value,
            }
            for row, (value, row_tokens) in enumerate(zip(frame[self.image_column], tokens))
        ]
        if self.split_column is None or self.split_column not in frame.columns:
            return self._random_split(records), class_names
        return self._csv_splits(csv, frame[self.split_column], records), class_names

    def _image_path(self, csv: Path, row: int, value: str, column: str | None = None) -> str:
        """The row's image path in ``column`` (default: the image column), relative to the CSV's
        folder; it must exist."""
        path = csv.parent / value.strip()
        if not value.strip() or not path.is_file():
            raise DataError(f"{csv} line {row + 2}, column '{column or self.image_column}': image not found: {path}")
        return str(path)

    def _label(self, csv: Path, row: int, tokens: list[str], class_names: list[str]) -> int | np.ndarray:
        """Class index (multi-class) or 0/1 float32 vector (multi-label) of one row."""
        if not tokens and not self.multilabel:
            raise DataError(f"{csv} line {row + 2}: empty label in column '{self.label_column}'")
        indices = []
        for token in tokens:
            if token in class_names:
                indices.append(class_names.index(token))
            elif token.isdigit() and int(token) < len(class_names):
                indices.append(int(token))
            else:
                raise DataError(
                    f"{csv} line {row + 2}: label '{token}' in column '{self.label_column}' is not one of "
                    f"the classes {class_names}"
                )
        if self.multilabel:
            target = np.zeros(len(class_names), dtype=np.float32)
            target[indices] = 1.0
            return target
        return indices[0]

    def _csv_splits(self, csv: Path, values: pd.Series, records: list[Record]) -> dict[str, list[Record]]:
        """Group records by the CSV's split column."""
        splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
        for row, (value, record) in enumerate(zip(values, records)):
            split = value.strip().lower()
            if split not in splits:
                raise DataError(
                    f"{csv} line {row + 2}: split '{value}' in column '{self.split_column}' "
                    f"is not one of {list(SPLITS)}"
                )
            splits[split].append(record)
        return splits
