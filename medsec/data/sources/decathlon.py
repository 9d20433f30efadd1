"""Medical Segmentation Decathlon folders: ``dataset.json`` plus ``imagesTr/`` and ``labelsTr/`` NIfTI files.

Label names and channels come from ``dataset.json`` (read with MONAI's Decathlon helpers). Only
the labelled ``training`` list is used (MSD never released test labels); it is split here, at
random with a seed or as k folds. ``validate`` checks every case before training: image and
label shapes and affines agree (NIfTI headers) and label values are among the declared labels.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist, load_decathlon_properties

from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData, require_path, split_by_group
from medsec.errors import DataError

MAX_LISTED = 10


def case_name(path: str | Path) -> str:
    """``imagesTr/hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name)


def _label_names(labels: dict[str, str], where: Path) -> list[str]:
    """Foreground names in value order; values must be 0..K."""
    try:
        by_value = {int(k): str(v) for k, v in labels.items()}
    except ValueError as err:
        raise DataError(f"{where}: 'labels' keys must be integers, got {sorted(labels)}") from err
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise DataError(f"{where}: 'labels' must number 0 (background) to K >= 1, got {sorted(by_value)}")
    return [by_value[k] for k in range(1, len(by_value))]


def fold_split(n: int, num_folds: int, fold: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded k-fold split of ``n`` cases: fold ``fold`` is the test set; the first
    ``val_fraction`` of the (shuffled) rest is the validation set."""
    if not 0 <= fold < num_folds <= n:
        raise DataError(f"decathlon: fold must be in [0, num_folds={num_folds}) with num_folds <= {n} cases, "
                        f"got fold={fold}")
    order = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(order, num_folds)
    rest = np.concatenate([f for k, f in enumerate(folds) if k != fold])
    n_val = max(1, round(val_fraction * len(rest)))
    return {"train": np.sort(rest[n_val:]), "val": np.sort(rest[:n_val]), "test": np.sort(folds[fold])}


class DecathlonSource(DataSource):
    """A Decathlon task folder (e.g. ``Task04_Hippocampus``) as segmentation records.

    Args:
        root: the folder holding ``dataset.json``.
        fold: ``None`` for a random train/val/test split by ``fractions``; ``k`` for k-fold
            cross-validation: fold ``k`` of ``num_folds`` is the test set and a share
            ``fractions[1] / (fractions[0] + fractions[1])`` of the rest is the validation set.
        num_folds: folds for ``fold``.
        fractions: train/val/test shares of the cases.
        seed: seeds the split.
        max_cases: use only the first cases of the list (quick runs and tests).
        validate: check every case's shapes, affines and label values when loading.
    """

    def __init__(
        self,
        root: str,
        fold: int | None = None,
        num_folds: int = 5,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        max_cases: int | None = None,
        validate: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.fold = fold
        self.num_folds = int(num_folds)
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)
        self.max_cases = max_cases
        self.validate = validate

    def load(self) -> SourceData:
        json_path = require_path(self.root / "dataset.json", "decathlon: dataset file")
        try:
            props = load_decathlon_properties(json_path, ["name", "labels", "modality"])
            cases = load_decathlon_datalist(json_path, is_segmentation=True, base_dir=self.root)
        except (ValueError, KeyError, OSError) as err:  # JSON errors are ValueErrors
            raise DataError(f"cannot read {json_path}: {type(err).__name__}: {err}") from err
        if "labels" not in props or "modality" not in props:
            raise DataError(f"{json_path} lacks 'labels' or 'modality'")
        class_names = _label_names(props["labels"], json_path)
        records = [{"image": c["image"], "mask": c["label"], "id": case_name(c["image"])} for c in cases]
        records = records[: self.max_cases] if self.max_cases else records
        self._check_files(records, json_path)
        if self.validate:
            for record in records:
                check_case(record, len(class_names), len(props["modality"]))
        splits = self._split(len(records))
        return SourceData(
            splits={s: [records[i] for i in splits[s]] for s in SPLITS},
            class_names=class_names,
            spatial_dims=3,
            from_files=True,
            info={"source": "decathlon", "name": props.get("name"), "root": str(self.root),
                  "channels": len(props["modality"]), "fold": self.fold, "seed": self.seed,
                  "cases": {s: [records[i]["id"] for i in splits[s]] for s in SPLITS}},
        )

    def _split(self, n: int) -> dict[str, np.ndarray]:
        if self.fold is None:
            return split_by_group(list(range(n)), self.fractions, self.seed)
        val_fraction = self.fractions[1] / max(self.fractions[0] + self.fractions[1], 1e-9)
        return fold_split(n, self.num_folds, self.fold, val_fraction, self.seed)

    @staticmethod
    def _check_files(records: list[Record], json_path: Path) -> None:
        missing = [f"{r['id']}: {r[key]}" for r in records for key in ("image", "mask")
                   if not Path(r[key]).is_file()]
        if missing:
            more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise DataError(f"{json_path} lists {len(missing)} missing file(s): "
                            f"{'; '.join(missing[:MAX_LISTED])}{more}")


def check_case(record: Record, num_classes: int, channels: int) -> None:
    """Raise a :class:`DataError` naming the case when its image and label disagree in shape or
    affine, the image lacks ``channels`` channels, or a label value is not in 0..``num_classes``."""
    case = record["id"]
    try:
        image, label = nib.load(record["image"]), nib.load(record["mask"])
        values = np.unique(np.asanyarray(label.dataobj))
    except Exception as err:  # nibabel raises many types; all mean "cannot read this case"
        raise DataError(f"case {case}: cannot read its NIfTI files: {type(err).__name__}: {err}") from err
    spatial = image.shape[:3]
    have_channels = image.shape[3] if len(image.shape) > 3 else 1
    problems: list[str] = []
    if have_channels != channels:
        problems.append(f"image has {have_channels} channel(s), dataset.json declares {channels}")
    if tuple(label.shape) != tuple(spatial):
        problems.append(f"label shape {label.shape} differs from image shape {spatial}")
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        problems.append("label affine differs from the image affine")
    bad = [v for v in values.tolist() if v not in range(num_classes + 1)]
    if bad:
        problems.append(f"label values {bad} are not among the declared labels 0..{num_classes}")
    if problems:
        raise DataError(f"case {case} ({record['image']}): {'; '.join(problems)}")

