"""The contract every data source fulfils, and helpers they share."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsec.errors import DataError

SPLITS = ("train", "val", "test")

Record = dict[str, Any]
"""One sample: ``image`` (array with channel first, or a file path), ``label`` (int for multi-class,
float vector with -1 for unknown findings for multi-label), optional ``mask`` and an ``id``."""


@dataclass
class SourceData:
    """What a source hands the DataModule: records per split plus what the task needs to know."""

    splits: dict[str, list[Record]]
    class_names: list[str]
    multilabel: bool = False
    spatial_dims: int = 2
    from_files: bool = False
    """True when ``image`` (and ``mask``) entries are paths to be read with MONAI's ``LoadImage``."""
    info: dict[str, Any] = field(default_factory=dict)
    reader: Callable[[Record], Record] | None = None
    """A picklable map transform that turns a record into arrays first thing in the pipeline (e.g.
    decryption inside DataLoader workers); ``None``: records already hold arrays, or paths when
    ``from_files``."""
    train_class_counts: list[int] | None = None
    """Training examples per class, for sources whose records carry no readable label."""

    def __post_init__(self) -> None:
        for split in SPLITS:
            if not self.splits.get(split):
                raise DataError(f"split '{split}' is empty ({self.info.get('source', 'data source')})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> list[int] | None:
        """Training examples per class (multi-class data), e.g. for balanced class weights."""
        if self.train_class_counts is not None or self.multilabel or "label" not in self.splits["train"][0]:
            return self.train_class_counts
        labels = np.asarray([int(r["label"]) for r in self.splits["train"]])
        return np.bincount(labels, minlength=self.num_classes).tolist()


class DataSource(ABC):
    """Reads one kind of data set and returns :class:`SourceData`. Knows nothing of training."""

    location_fields: tuple[str, ...] = ("root", "path", "file", "csv", "image_dir", "download")
    """Attributes that say *where* the data lives, not *what* it is: left out of :attr:`dataset_id`."""

    @property
    def dataset_id(self) -> str:
        """A stable name for what this source reads: its kind plus a digest of its settings (not
        of its location, so moving the data keeps the id). Encrypted stores are bound to it."""
        kind = type(self).__name__.removesuffix("Source").lower()
        identity = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in self.location_fields}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return f"{kind}-{digest[:12]}"

    @abstractmethod
    def load(self) -> SourceData:
        """Read (or generate) the data set and split it."""


def require_path(path: str | Path, what: str) -> Path:
    """Return ``path`` as a ``Path`` or raise a :class:`DataError` naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    return path


def split_by_group(
    groups: Sequence[Hashable], fractions: Sequence[float], seed: int
) -> dict[str, np.ndarray]:
    """Split sample indices into train/val/test so that no group (patient) spans two splits.

    ``fractions`` are the train/val/test shares of *groups*; the assignment is a seeded shuffle.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    unique = sorted(set(groups), key=str)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.round(np.cumsum(fractions)[:2] * len(unique)).astype(int)
    split_of_group: dict[Hashable, str] = {}
    for rank, idx in enumerate(order):
        split_of_group[unique[idx]] = SPLITS[int(np.searchsorted(cuts, rank, side="right"))]
    indices: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, group in enumerate(groups):
        indices[split_of_group[group]].append(i)
    return {s: np.asarray(v, dtype=np.int64) for s, v in indices.items()}


def read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with every cell as a string; raise a :class:`DataError` naming the file or the
    missing columns. Row ``i`` of the frame is line ``i + 2`` of the file (line 1 is the header)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:  # pandas parse errors are ValueErrors
        raise DataError(f"cannot read CSV file {path}: {err}") from err
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(f"CSV file {path} lacks column(s) {missing}; it has {list(frame.columns)}")
    return frame
