"""2D slices of a Decathlon task's volumes, as images (for denoising and other 2D image tasks)."""
from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from medsec.data.sources.base import SPLITS, Record, SourceData
from medsec.data.sources.decathlon import DecathlonSource
from medsec.errors import DataError


def to_uint8(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """A volume's intensities as 8-bit levels, clipped to its ``percentiles`` range."""
    low, high = np.percentile(volume, percentiles)
    scaled = (volume - low) / (high - low) if high > low else np.zeros_like(volume, dtype=np.float64)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


class DecathlonSlicesSource(DecathlonSource):
    """The slices along ``axis`` of every case of a Decathlon folder that cross the labelled
    structure, as 8-bit (1, H, W) images (each volume scaled by its 0.5/99.5 percentiles).

    Splits are by case (no patient in two splits), as :class:`DecathlonSource` makes them; the
    labels are dropped (class ``"slice"``). Slice sizes follow the volumes: set the data module's
    ``image_size`` to batch them.

    Args:
        axis: the volume axis the slices are taken along.
        max_slices: keep at most this many slices per case, evenly spaced (``None``: all).
        root, fold, num_folds, fractions, seed, max_cases, validate: as :class:`DecathlonSource`.
    """

    def __init__(self, root: str, axis: int = 0, max_slices: int | None = None, fold: int | None = None,
                 num_folds: int = 5, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                 max_cases: int | None = None, validate: bool = True) -> None:
        super().__init__(root, fold=fold, num_folds=num_folds, fractions=fractions, seed=seed,
                         max_cases=max_cases, validate=validate)
        if axis not in (0, 1, 2):
            raise DataError(f"decathlon_slices: axis must be 0, 1 or 2, got {axis}")
        self.axis = int(axis)
        self.max_slices = max_slices

    def load(self) -> SourceData:
        volumes = super().load()
        splits = {split: [s for case in volumes.splits[split] for s in self.slices(case)] for split in SPLITS}
        return SourceData(splits=splits, class_names=["slice"], spatial_dims=2,
                          info=volumes.info | {"source": "decathlon_slices", "axis": self.axis})

    def slices(self, case: Record) -> list[Record]:
        """The labelled slices of one case."""
        try:
            image = np.asanyarray(nib.load(case["image"]).dataobj, dtype=np.float64)
            mask = np.asanyarray(nib.load(case["mask"]).dataobj)
        except Exception as err:  # nibabel raises many types; all mean "cannot read this case"
            raise DataError(f"case {case['id']}: cannot read its NIfTI files: {type(err).__name__}: {err}") from err
        if image.ndim != 3:
            raise DataError(f"case {case['id']} ({case['image']}): decathlon_slices needs single-channel 3D "
                            f"volumes, got shape {image.shape}")
        levels = np.moveaxis(to_uint8(image), self.axis, 0)
        labelled = np.flatnonzero(np.moveaxis(mask, self.axis, 0).reshape(len(levels), -1).any(1))
        if self.max_slices and len(labelled) > self.max_slices:
            labelled = labelled[np.linspace(0, len(labelled) - 1, self.max_slices).round().astype(int)]
        return [{"image": levels[k][None], "label": 0, "id": f"{case['id']}-{self.axis}{k:03d}"} for k in labelled]
