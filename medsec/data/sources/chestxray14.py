"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 14-finding multi-label chest X-ray classification.

Reads NIH's label file (``Data_Entry_2017*.csv``) and the PNGs, either flat in ``root/images`` or in
NIH's download layout ``root/images_001/images/...``. Splits are patient-disjoint; NIH's official
test list is used when ``train_val_list.txt`` and ``test_list.txt`` lie in ``root``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsec.data.sources.base import DataSource, SourceData, read_csv, require_path, split_by_group
from medsec.errors import DataError

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
IMAGE, LABELS, PATIENT, VIEW = "Image Index", "Finding Labels", "Patient ID", "View Position"
MAX_LISTED = 5


def _targets(frame: pd.DataFrame, csv: Path) -> np.ndarray:
    """Parse ``Finding Labels`` (``|``-separated) into an (N, 14) float32 matrix."""
    index = {name: i for i, name in enumerate(FINDINGS)}
    targets = np.zeros((len(frame), len(FINDINGS)), dtype=np.float32)
    for row, value in enumerate(frame[LABELS]):
        for finding in value.split("|"):
            if finding in index:
                targets[row, index[finding]] = 1.0
            elif finding != NO_FINDING:
                raise DataError(
                    f"{csv} line {row + 2}: unknown finding '{finding}' in column '{LABELS}' "
                    f"(known: {', '.join(FINDINGS)}, {NO_FINDING})"
                )
    return targets


def _image_paths(root: Path, image_dir: str) -> dict[str, Path]:
    """Map file name -> path over ``root/image_dir`` and NIH's ``root/images_*/images`` folders."""
    folders = [root / image_dir, *sorted(root.glob("images_*/images"))]
    paths: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    paths.setdefault(entry.name, Path(entry.path))
    return paths


def _subsample_patients(patients: pd.Series, max_images: int, seed: int) -> np.ndarray:
    """Row indices of a seeded random set of whole patients holding at most ``max_images`` images
    (at least one patient)."""
    counts = patients.value_counts(sort=False)
    order = counts.index[np.random.default_rng(seed).permutation(len(counts))]
    keep = set(order[np.cumsum(counts.loc[order].to_numpy()) <= max_images]) or {order[0]}
    return np.flatnonzero(patients.isin(keep).to_numpy())


def _read_list(path: Path) -> set[str]:
    """Image names of one of NIH's split lists, one per line."""
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


class ChestXray14Source(DataSource):
    """NIH ChestX-ray14 as 14-finding multi-label records (image paths).

    Args:
        root: the data set folder.
        csv: the label file; default: the single ``root/Data_Entry_2017*.csv``.
        image_dir: folder of the PNGs, relative to ``root``.
        views: keep rows whose ``View Position`` is one of these (NIH has PA and AP).
        fractions: train/val/test shares of patients; with NIH's official lists only the train/val
            ratio is used (the test split is NIH's).
        seed: seeds the split and the ``max_images`` subsample.
        max_images: keep a random subset of whole patients with at most this many images.
    """

    def __init__(
        self,
        root: str,
        csv: str | None = None,
        image_dir: str = "images",
        views: Sequence[str] = ("PA", "AP"),
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.csv = csv
        self.image_dir = image_dir
        self.views = tuple(views)
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)
        self.max_images = max_images

    def _csv_path(self) -> Path:
        """``csv`` if given, else the single ``Data_Entry_2017*.csv`` in ``root``."""
        if self.csv:
            return require_path(self.csv, "ChestX-ray14 label CSV")
        found = sorted(self.root.glob("Data_Entry_2017*.csv"))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
            raise DataError(f"ChestX-ray14: expected one Data_Entry_2017*.csv in {self.root}, found {what}")
        return found[0]

    def _official_lists(self) -> tuple[Path, Path] | None:
        """NIH's ``train_val_list.txt`` and ``test_list.txt`` in ``root``, when both are there."""
        lists = (self.root / "train_val_list.txt", self.root / "test_list.txt")
        return lists if all(path.exists() for path in lists) else None

    def _split(self, frame: pd.DataFrame, lists: tuple[Path, Path] | None) -> dict[str, np.ndarray]:
        """Row indices per split: NIH's official test list when given, else patient-disjoint shares."""
        patients = frame[PATIENT].tolist()
        if lists is None:
            return split_by_group(patients, self.fractions, self.seed)
        train_val_list, test_list = lists
        names = frame[IMAGE]
        test = np.flatnonzero(names.isin(_read_list(test_list)).to_numpy())
        train_val = np.flatnonzero(names.isin(_read_list(train_val_list)).to_numpy())
        share = self.fractions[0] + self.fractions[1]
        if share <= 0:
            raise DataError(f"ChestX-ray14: train and val fractions are both 0: {list(self.fractions)}")
        shares = (self.fractions[0] / share, self.fractions[1] / share, 0.0)
        parts = split_by_group([patients[i] for i in train_val], shares, self.seed)
        return {"train": train_val[parts["train"]], "val": train_val[parts["val"]], "test": test}

    def load(self) -> SourceData:
        require_path(self.root, "ChestX-ray14 folder")
        csv = self._csv_path()
        frame = read_csv(csv, [IMAGE, LABELS, PATIENT, VIEW])
        targets = _targets(frame, csv)
        keep = frame[VIEW].isin(self.views).to_numpy()
        if not keep.any():
            raise DataError(f"{csv}: no row has '{VIEW}' in {list(self.views)}")
        frame, targets = frame[keep].reset_index(drop=True), targets[keep]
        if self.max_images is not None:
            rows = _subsample_patients(frame[PATIENT], self.max_images, self.seed)
            frame, targets = frame.iloc[rows].reset_index(drop=True), targets[rows]
        paths = _image_paths(self.root, self.image_dir)
        missing = [name for name in frame[IMAGE] if name not in paths]
        if missing:
            raise DataError(
                f"ChestX-ray14: {len(missing)} of {len(frame)} images listed in {csv} are missing from "
                f"{self.root / self.image_dir} (and images_*/images), e.g. {', '.join(missing[:MAX_LISTED])}"
            )
        records = [
            {"image": str(paths[name]), "label": target, "id": name, "patient": str(patient)}
            for name, target, patient in zip(frame[IMAGE], targets, frame[PATIENT])
        ]
        lists = self._official_lists()
        splits = {s: [records[i] for i in idx] for s, idx in self._split(frame, lists).items()}
        return SourceData(
            splits=splits,
            class_names=list(FINDINGS),
            multilabel=True,
            from_files=True,
            info={"source": "chestxray14", "csv": str(csv), "official_split": lists is not None},
        )
