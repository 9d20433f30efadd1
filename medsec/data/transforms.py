"""Named MONAI transform pipelines, plus the few small transforms MONAI does not have."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import NibabelReader, PILReader
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    RandAffined,
    RandFlipd,
    Resized,
)

from medsec.data.dicom import DICOM_SUFFIXES, DicomReader, is_dicom
from medsec.data.intensity import ScaleToUnitd, intensity_transforms
from medsec.errors import DataError

__all__ = ["KeysT", "LoadImageNamed", "ScaleToUnitd", "ToChannelsd", "classification_transforms"]

KeysT = str | Sequence[str]


class LoadImageNamed(MapTransform):
    """Read ``keys`` from files with MONAI's ``LoadImage`` (PIL, nibabel and medsec's DICOM readers).

    A file that cannot be read (missing, truncated, unknown format) raises :class:`DataError`
    naming the file, instead of a bare reader exception deep inside a worker. 2D PNG/JPEG and
    DICOM images are read in (row, column) order, as they are displayed; a list of DICOM files is
    one series, read as a volume (:class:`~medsec.data.dicom.DicomReader`).
    """

    def __init__(self, keys: KeysT, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        # LoadImage probes every reader, the GPU DICOM decoder included: no news on a CPU machine
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self.loaders = self._make_loaders()

    @staticmethod
    def _make_loaders() -> dict[tuple[str, ...], LoadImage]:
        return {
            (".png", ".jpg", ".jpeg", ".bmp"): LoadImage(image_only=True, ensure_channel_first=True, dtype=None,
                                                         reader=PILReader(reverse_indexing=False)),
            DICOM_SUFFIXES: LoadImage(image_only=True, ensure_channel_first=True, dtype=None, reader=DicomReader()),
            (".nii", ".nii.gz"): LoadImage(image_only=True, ensure_channel_first=True, dtype=None,
                                           reader=NibabelReader()),
        }

    def _read(self, path: str | Sequence[str]) -> torch.Tensor:
        if isinstance(path, (list, tuple)):  # the files of a DICOM series
            return self._load(self.loaders[DICOM_SUFFIXES], list(path), f"DICOM series {Path(path[0]).parent}")
        name = str(path).lower()
        loader = next((ld for suffixes, ld in self.loaders.items() if name.endswith(suffixes)), None)
        if loader is None and is_dicom(path):  # DICOM files often have no suffix
            loader = self.loaders[DICOM_SUFFIXES]
        if loader is None:
            raise DataError(f"cannot read image file {path}: unsupported type (use PNG, JPEG, DICOM or NIfTI)")
        return self._load(loader, path, f"image file {path}")

    @staticmethod
    def _load(loader: LoadImage, path: str | list[str], what: str) -> torch.Tensor:
        try:
            return loader(path)
        except DataError:
            raise
        except Exception as err:  # readers raise many types; all mean "cannot read this file"
            raise DataError(f"cannot read {what}: {type(err).__name__}: {err}") from err

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._read(d[key])
        return d


class ToChannelsd(MapTransform):
    """Make images have ``channels`` channels: RGB(A) -> grey by averaging, grey -> RGB by repeating."""

    def __init__(self, keys: KeysT, channels: int) -> None:
        super().__init__(keys)
        if channels not in (1, 3):
            raise DataError(f"in_channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            have = img.shape[0]
            if have == self.channels:
                continue
            if self.channels == 1 and have in (3, 4):
                d[key] = img[:3].mean(0, keepdim=True)
            elif self.channels == 3 and have == 1:
                d[key] = img.repeat(3, *([1] * (img.ndim - 1)))
            else:
                raise DataError(f"cannot turn a {have}-channel image into {self.channels} channels ({d.get('id', key)})")
        return d


def classification_transforms(
    *,
    train: bool,
    reader: Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]] | None,
    in_channels: int,
    spatial_dims: int,
    image_size: int | None = None,
    augment: bool = True,
    multilabel: bool = False,
    intensity: Mapping[str, Any] | None = None,
    labelled: bool = True,
) -> Compose:
    """The classification pipeline: read, bring intensities to [0, 1], fix channels, resize, augment, type.

    ``reader`` runs first (e.g. :class:`LoadImageNamed` for file records, or a decrypting reader);
    ``intensity`` selects the modality's intensity transforms (:mod:`medsec.data.intensity`;
    default: 8-bit / 255, else min-max per image); ``labelled=False``: records without labels
    (``medsec predict``).

    MONAI's ``CacheDataset`` caches everything before the first random transform, so only the
    augmentation runs every epoch. Output: ``image`` float32 in [0, 1] with ``in_channels``
    channels and ``label`` int64 (multi-class) or float32 (multi-label, -1 = unknown).
    """
    steps: list = [reader] if reader is not None else []
    steps += [*intensity_transforms(intensity), ToChannelsd("image", in_channels)]
    if image_size:
        steps.append(Resized("image", spatial_size=(image_size,) * spatial_dims, mode="area"))
    if train and augment:
        steps += [
            RandFlipd("image", prob=0.5, spatial_axis=spatial_dims - 1),
            RandAffined("image", prob=0.5, rotate_range=[0.1] * (1 if spatial_dims == 2 else 3),
                        scale_range=[0.1] * spatial_dims, padding_mode="zeros"),
        ]
    steps.append(EnsureTyped("image", dtype=torch.float32, track_meta=False))
    if labelled:
        steps.append(EnsureTyped("label", dtype=torch.float32 if multilabel else torch.int64, track_meta=False))
    return Compose(steps)


def random_patches(images: torch.Tensor, size: int | None, per_image: int = 1) -> torch.Tensor:
    """``per_image`` random ``size`` patches of every image of the batch (B, C, *spatial); the images
    themselves when ``size`` is ``None`` or not smaller than them."""
    spatial = images.shape[2:]
    if not size or all(size >= extent for extent in spatial):
        return images
    cuts = []
    for image in images:
        for _ in range(per_image):
            starts = [int(torch.randint(max(extent - size, 0) + 1, ())) for extent in spatial]
            cuts.append(image[(slice(None), *(slice(s, s + size) for s in starts))])
    return torch.stack(cuts)
