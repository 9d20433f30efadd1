"""New, unlabelled inputs for ``medsec predict``: files, folders, CSV lists, DICOM series, encrypted stores.

:func:`find_inputs` turns what the user names into :class:`Input` entries (one per image or DICOM
series), :func:`input_reader` reads them as the training pipeline expects and checks that they fit
the model (dimensionality, DICOM modality), naming the file when they do not. Everything here is
untrusted: counts and sizes are bounded before anything large is read.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Compose, MapTransform
from PIL import Image

from medsec.data.dicom import DICOM_SUFFIXES, MAX_VOXELS, image_header, is_dicom
from medsec.data.intensity import MODALITIES
from medsec.data.sources.base import read_csv
from medsec.data.transforms import LoadImageNamed
from medsec.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz")
MAX_INPUTS = 100_000
STORE_MARKERS = ("CURRENT", "manifest.json")


@dataclass(frozen=True)
class Input:
    """One input: ``id`` names it in the outputs; ``image`` is a file, or the files of a DICOM
    series (``series=True``), or ``None`` for a ``record`` (split, index) of an encrypted store."""

    id: str
    image: str | tuple[str, ...] | None = None
    series: bool = False
    record: tuple[str, int] | None = None

    @property
    def path(self) -> Path | None:
        """The file (or for a series, its first file) the input was read from."""
        if self.image is None:
            return None
        return Path(self.image if isinstance(self.image, str) else self.image[0])

    @property
    def from_dicom(self) -> bool:
        """Whether the input was read from DICOM (a file or a series)."""
        return self.path is not None and (self.series or is_dicom(self.path))

    def payload(self) -> dict[str, Any]:
        """The record handed to the pipeline."""
        if self.record is not None:
            return {"record": self.record, "id": self.id}
        return {"image": self.image if isinstance(self.image, str) else list(self.image), "id": self.id}


def is_store(path: Path) -> bool:
    """Whether ``path`` is an encrypted record store's directory."""
    return path.is_dir() and any((path / marker).is_file() for marker in STORE_MARKERS)


def _check_size(path: Path) -> None:
    """Refuse an image whose header announces more than :data:`MAX_VOXELS` voxels (read lazily)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            shape = nib.load(path).shape
        elif name.endswith(IMAGE_SUFFIXES):
            with Image.open(path) as image:
                shape = (*image.size, len(image.getbands()))
        else:
            return
    except Exception as err:  # noqa: BLE001 - nibabel and PIL raise many types; all mean "unreadable"
        raise DataError(f"cannot read image file {path}: {type(err).__name__}: {err}") from None
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise DataError(f"image file {path}: shape {tuple(shape)} exceeds the limit of {MAX_VOXELS} voxels")


def _series(files: Sequence[Path], root: Path) -> list[Input]:
    """DICOM files grouped into series (by folder and ``SeriesInstanceUID``), one input each."""
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in files:
        uid = str(getattr(image_header(path), "SeriesInstanceUID", "") or "")
        groups[(path.parent, uid)].append(path)
    per_folder = defaultdict(int)
    for folder, _ in groups:
        per_folder[folder] += 1
    inputs = []
    for (folder, uid), members in sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        name = folder.relative_to(root).as_posix() if folder != root else (root.name or "series")
        name = name if per_folder[folder] == 1 else f"{name}/{uid or 'no-uid'}"
        inputs.append(Input(name, tuple(str(p) for p in sorted(members)), series=True))
    return inputs


def _folder(root: Path, spatial_dims: int) -> list[Input]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    dicoms = [p for p in files if is_dicom(p)]
    images = [p for p in files if p.name.lower().endswith(IMAGE_SUFFIXES)]
    if len(dicoms) + len(images) > MAX_INPUTS:
        raise DataError(f"input folder {root} holds more than {MAX_INPUTS} images")
    inputs = [Input(p.relative_to(root).as_posix(), str(p)) for p in images]
    if spatial_dims == 3:
        inputs += _series(dicoms, root)
    else:
        for path in dicoms:
            image_header(path)  # a damaged file is named now, not half-way through
            inputs.append(Input(path.relative_to(root).as_posix(), str(path)))
    return sorted(inputs, key=lambda item: item.id)


def _one(path: Path, name: str, spatial_dims: int) -> list[Input]:
    """A file or a folder named by the user (directly or in a CSV)."""
    if path.is_dir():
        found = _folder(path, spatial_dims)
        if not found:
            raise DataError(f"input folder {path} holds no images ({', '.join((*IMAGE_SUFFIXES, *DICOM_SUFFIXES))})")
        return found if len(found) > 1 or not found[0].series else [Input(name, found[0].image, series=True)]
    if is_dicom(path):
        image_header(path)
        return [Input(name, str(path))]
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"cannot read image file {path}: unsupported type (use PNG, JPEG, DICOM or NIfTI)")
    return [Input(name, str(path))]


def find_inputs(location: str | Path, spatial_dims: int, column: str = "image") -> list[Input]:
    """The inputs at ``location``: an image file, a folder (images and DICOM files; for a 3D model
    DICOM files form one volume per series), or a CSV whose ``column`` lists files or series
    folders (relative to the CSV). Identifiers are paths relative to the folder or CSV."""
    path = Path(location).expanduser()
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_file() and path.suffix.lower() == ".csv":
        frame = read_csv(path, [column])
        if len(frame) > MAX_INPUTS:
            raise DataError(f"input CSV {path} lists more than {MAX_INPUTS} inputs")
        inputs = []
        for row, value in enumerate(frame[column]):
            entry = path.parent / value.strip()
            if not value.strip() or not entry.exists():
                raise DataError(f"{path} line {row + 2}, column '{column}': input not found: {entry}")
            inputs += _one(entry, value.strip(), spatial_dims)
    else:
        inputs = _one(path, path.name, spatial_dims)
    for item in inputs:
        if not item.series and item.path is not None:
            _check_size(item.path)
    ids = sorted(item.id for item in inputs)
    repeated = next((a for a, b in pairwise(ids) if a == b), None)
    if repeated is not None:
        raise DataError(f"inputs at {path}: two inputs share the name {repeated!r}")
    return inputs


def store_inputs(store: Any, split: str | None = None) -> list[Input]:
    """The records of an open :class:`~medsec.protections.store.RecordStore` (of ``split``, or all)."""
    return [Input(record_id if split else f"{name}/{record_id}", record=(name, index))
            for name, entries in store.records.items() if split in (None, name)
            for index, (record_id, *_) in enumerate(entries)]


class CheckInputd(MapTransform):
    """Check a freshly read input against the model: ``spatial_dims`` spatial dimensions and, for
    DICOM, a ``Modality`` the model's intensity config accepts (or ``OT``, other). Keeps the input's geometry as
    ``input_affine`` (4x4) and ``input_shape`` for writing outputs on the input's grid."""

    def __init__(self, spatial_dims: int, modality: str | None) -> None:
        super().__init__("image")
        self.spatial_dims = spatial_dims
        self.modality = modality

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, name = d["image"], d.get("id", "?")
        if image.ndim != self.spatial_dims + 1:
            raise DataError(f"input {name}: a {image.ndim - 1}D image of shape {tuple(image.shape[1:])}, but the "
                            f"model takes {self.spatial_dims}D images")
        meta = image.meta if isinstance(image, MetaTensor) else {}
        declared = ((meta.get("dicom") or {}).get("00080060") or {}).get("Value", [None])[0]
        if self.modality and declared not in (None, "OT", *MODALITIES[self.modality]):  # OT: other, unknown
            raise DataError(f"input {name}: DICOM modality {declared}, but the model was trained on "
                            f"{self.modality} (data.intensity.modality)")
        affine = image.affine if isinstance(image, MetaTensor) else torch.as_tensor(d.get("affine", np.eye(4)))
        d["input_affine"] = torch.as_tensor(to_affine_nd(3, affine.double()), dtype=torch.float64)
        d["input_shape"] = torch.as_tensor(image.shape[1:])
        return d


def input_reader(spatial_dims: int, modality: str | None) -> Compose:
    """Read an :class:`Input`'s payload (a file or a series) and check it (:class:`CheckInputd`)."""
    return Compose([LoadImageNamed("image"), CheckInputd(spatial_dims, modality)])
