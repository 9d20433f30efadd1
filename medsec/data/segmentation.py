"""The segmentation pipeline: image + mask records (arrays or files) to (image, label map) batches."""
from __future__ import annotations

import gzip
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from medsec.data.intensity import intensity_transforms
from medsec.errors import ConfigError, DataError

KEYS = ("image", "label")


class MaskAsLabeld(MapTransform):
    """Make the record's ``mask`` its ``label`` (replacing an image-level class label, if any)."""

    def __init__(self) -> None:
        super().__init__("mask")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("mask") is None:
            raise DataError(f"case {d.get('id', '?')} has no segmentation mask")
        d["label"] = d.pop("mask")
        return d


class CheckCased(MapTransform):
    """Check one case as soon as it is read: ``in_channels`` image channels, a one-channel mask of
    the image's spatial shape, and (when both carry one) the same affine. Errors name the case.
    A case without ``label`` (``medsec predict``) has its image checked only."""

    def __init__(self, in_channels: int, spatial_dims: int) -> None:
        super().__init__(KEYS)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get("id", "?")
        image, label = d["image"], d.get("label")
        if image.ndim != self.spatial_dims + 1 or image.shape[0] != self.in_channels:
            raise DataError(f"case {case}: image has shape {tuple(image.shape)}; expected {self.in_channels} "
                            f"channel(s) and {self.spatial_dims} spatial dimensions")
        if label is None:
            return d
        if tuple(label.shape) != (1, *image.shape[1:]):
            raise DataError(f"case {case}: mask shape {tuple(label.shape)[1:]} differs from image shape "
                            f"{tuple(image.shape)[1:]}")
        if isinstance(image, MetaTensor) and isinstance(label, MetaTensor) \
                and not torch.allclose(image.affine.double(), label.affine.double(), atol=1e-3):
            raise DataError(f"case {case}: mask affine differs from the image affine")
        return d


class StoreAffined(MapTransform):
    """Keep the image's affine as a plain ``affine`` tensor (identity for arrays without one),
    so that it survives ``EnsureTyped(track_meta=False)`` and predictions can be saved with it."""

    def __init__(self) -> None:
        super().__init__("image")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d["image"]
        affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
        d["affine"] = torch.as_tensor(affine, dtype=torch.float64)
        return d


def _augmentations(spatial_dims: int, flip_prob: float, intensity_jitter: float) -> list[MapTransform]:
    steps: list[MapTransform] = [RandFlipd(KEYS, prob=flip_prob, spatial_axis=axis)
                                 for axis in range(spatial_dims)]
    if intensity_jitter:
        steps += [RandScaleIntensityd("image", factors=intensity_jitter, prob=0.5),
                  RandShiftIntensityd("image", offsets=intensity_jitter, prob=0.5)]
    return steps


def segmentation_transforms(
    *,
    train: bool,
    reader: Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]] | None,
    in_channels: int,
    spatial_dims: int,
    image_size: int | None = None,
    augment: bool = True,
    multilabel: bool = False,
    orientation: str | None = None,
    pixdim: Sequence[float] | None = None,
    normalize: Literal["percentiles", "zscore"] = "percentiles",
    crop_size: Sequence[int] | int | None = None,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    intensity: Mapping[str, Any] | None = None,
    labelled: bool = True,
) -> Compose:
    """Read, check, reorient/resample, normalise, (train:) crop and augment, type.

    ``normalize`` (``percentiles``: 0.5/99.5 to [0, 1], the pixel space the networks and attacks
    work in; ``zscore``) applies unless the data config's ``intensity`` selects a modality's
    transforms (:mod:`medsec.data.intensity`, e.g. a CT window). ``labelled=False``: records
    without masks (``medsec predict``).

    The record's ``mask`` becomes ``label``: an int64 label map ``(1, *spatial)`` whose value k is
    foreground class k (0 is background); ``image`` is float32 ``(in_channels, *spatial)`` and
    ``affine`` the image's 4x4 affine after reorientation/resampling (identity for arrays).
    Validation and test keep whole images (one per batch when sizes differ); training takes
    random ``crop_size`` crops (padded first), or whole images when ``crop_size`` is ``None``.
    ``multilabel`` is accepted for the DataModule's sake: a label map has one class per voxel.
    """
    if image_size is not None:
        raise ConfigError("data.image_size must be null for segmentation "
                          "(resample with data.pipeline.pixdim)")
    if normalize not in ("percentiles", "zscore"):
        raise ConfigError(f"data.pipeline.normalize must be 'percentiles' or 'zscore', got {normalize!r}")
    keys = KEYS if labelled else ("image",)
    steps: list = [reader] if reader is not None else []
    steps += [MaskAsLabeld()] if labelled else []
    steps += [EnsureTyped("image", dtype=torch.float32, track_meta=True)]
    steps += [EnsureTyped("label", dtype=torch.int64, track_meta=True)] if labelled else []
    steps.append(CheckCased(in_channels, spatial_dims))
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation, labels=None))  # axis labels from the image space
    if pixdim:
        steps.append(Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")[:len(keys)]))
    steps += [*intensity_transforms(intensity or {"modality": "mr", "normalize": normalize}), StoreAffined()]
    if train and crop_size is not None:
        steps += [SpatialPadd(KEYS, spatial_size=crop_size), RandSpatialCropd(KEYS, roi_size=crop_size)]
    if train and augment:
        steps += _augmentations(spatial_dims, flip_prob, intensity_jitter)
    steps.append(EnsureTyped("image", dtype=torch.float32, track_meta=False))
    steps += [EnsureTyped("label", dtype=torch.int64, track_meta=False)] if labelled else []
    return Compose(steps)


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file (``.nii.gz``) holding ``array`` with ``affine``."""
    return gzip.compress(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)).to_bytes(),
                         compresslevel=6)
