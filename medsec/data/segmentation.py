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
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

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
    the image's spatial shape, and (when both carry one) the same affine. Errors name the case."""

    def __init__(self, in_channels: int, spatial_dims: int) -> None:
        super().__init__(KEYS)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get("id", "?")
        image, label = d["image"], d["label"]
        if image.ndim != self.spatial_dims + 1 or image.shape[0] != self.in_channels:
            raise DataError(f"case {case}: image has shape {tuple(image.shape)}; expected {self.in_channels} "
                            f"channel(s) and {self.spatial_dims} spatial dimensions")
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


def _normaliser(normalize: str) -> MapTransform:
    if normalize == "percentiles":  # [0, 1], the pixel space the networks and attacks work in
        return ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                               clip=True, channel_wise=True)
    if normalize == "zscore":
        return NormalizeIntensityd("image", channel_wise=True)
    raise ConfigError(f"data.pipeline.normalize must be 'percentiles' or 'zscore', got {normalize!r}")


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
) -> Compose:
    """Read, check, reorient/resample, normalise, (train:) crop and augment, type.

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
    steps: list = [reader] if reader is not None else []
    steps += [
        MaskAsLabeld(),
        EnsureTyped("image", dtype=torch.float32, track_meta=True),
        EnsureTyped("label", dtype=torch.int64, track_meta=True),
        CheckCased(in_channels, spatial_dims),
    ]
    if orientation:
        steps.append(Orientationd(KEYS, axcodes=orientation, labels=None))  # axis labels from the image space
    if pixdim:
        steps.append(Spacingd(KEYS, pixdim=pixdim, mode=("bilinear", "nearest")))
    steps += [_normaliser(normalize), StoreAffined()]
    if train and crop_size is not None:
        steps += [SpatialPadd(KEYS, spatial_size=crop_size), RandSpatialCropd(KEYS, roi_size=crop_size)]
    if train and augment:
        steps += _augmentations(spatial_dims, flip_prob, intensity_jitter)
    steps += [
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.int64, track_meta=False),
    ]
    return Compose(steps)


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file (``.nii.gz``) holding ``array`` with ``affine``."""
    return gzip.compress(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)).to_bytes(),
                         compresslevel=6)
