"""Images with segmentation masks on disk (PNG, DICOM, NIfTI), listed by a CSV: ``image,mask[,split]``.

Paths are relative to the CSV's folder; a mask holds 0 for background and k for
``class_names[k - 1]`` on the image's grid (same shape and affine: a NIfTI mask of a DICOM image
takes the image's affine). The split comes from the CSV's split column, else it is random.
"""
from __future__ import annotations

from collections.abc import Sequence

from medsec.data.sources.base import SourceData, read_csv, require_path
from medsec.data.sources.folder import FolderSource
from medsec.errors import DataError


class ImageMaskSource(FolderSource):
    """Image/mask pairs for segmentation, from a CSV.

    Args:
        root: the data folder.
        csv: the CSV, relative to ``root`` (or absolute).
        class_names: the foreground classes, mask value 1 first.
        image_column, mask_column, split_column: the CSV's columns.
        fractions, seed: the random split when the CSV has no split column.
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(self, root: str, csv: str, class_names: Sequence[str], image_column: str = "image",
                 mask_column: str = "mask", split_column: str | None = "split",
                 fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, spatial_dims: int = 2) -> None:
        if not class_names:
            raise DataError("image_masks: class_names must name the foreground classes (mask values 1, 2, ...)")
        super().__init__(root, csv=csv, image_column=image_column, label_column=mask_column,
                         split_column=split_column, class_names=class_names, fractions=fractions, seed=seed,
                         spatial_dims=spatial_dims)

    def load(self) -> SourceData:
        csv = require_path(self.root / self.csv, "image/mask CSV")
        frame = read_csv(csv, [self.image_column, self.label_column])
        records = [{"image": self._image_path(csv, row, image), "id": image.strip(),
                    "mask": self._image_path(csv, row, mask, self.label_column)}
                   for row, (image, mask) in enumerate(zip(frame[self.image_column], frame[self.label_column]))]
        if self.split_column is None or self.split_column not in frame.columns:
            splits = self._random_split(records)
        else:
            splits = self._csv_splits(csv, frame[self.split_column], records)
        return SourceData(splits=splits, class_names=list(self.class_names), spatial_dims=self.spatial_dims,
                          from_files=True, info={"source": "image_masks", "root": str(self.root), "csv": self.csv})
