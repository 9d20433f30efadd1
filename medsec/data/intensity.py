"""Modality-aware intensities: how raw pixel values become the [0, 1] (or z-scored) values a network sees.

Selected by the data config's ``intensity`` mapping and stored with the rest of the data config
in every checkpoint, so that ``medsec eval`` and ``medsec predict`` repeat it:

- ``null`` (default): 8-bit images divided by 255, anything else min-max scaled per image.
- ``{modality: ct, window: lung}`` (``lung``, ``mediastinum``, ``abdomen``, ``bone``) or
  ``{modality: ct, level: 40, width: 400}``: Hounsfield units clipped to the window, scaled to [0, 1].
  DICOM is read in HU (rescale slope and intercept applied); NIfTI is expected to hold HU.
- ``{modality: mr, normalize: percentiles, lower: 0.5, upper: 99.5}`` (scaled to [0, 1] between
  the image's percentiles, clipped) or ``{modality: mr, normalize: zscore}`` (mean 0, std 1).
- ``{modality: xray}``: DICOM VOI LUT or window applied (pydicom's ``apply_voi_lut``),
  ``MONOCHROME1`` inverted (bright bone, as ``MONOCHROME2``), then scaled to [0, 1] as by default.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)
from pydicom.pixels import apply_voi_lut

from medsec.data.dicom import dicom_attributes
from medsec.errors import ConfigError

WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
"""CT window presets: (level, width) in Hounsfield units."""
MODALITIES: dict[str, frozenset[str]] = {
    "ct": frozenset({"CT"}),
    "mr": frozenset({"MR"}),
    "xray": frozenset({"CR", "DX", "MG", "RG", "RF", "XA", "IO", "PX"}),
}
"""The DICOM ``Modality`` values each intensity modality accepts."""
OPTIONS: dict[str, frozenset[str]] = {
    "ct": frozenset({"modality", "window", "level", "width"}),
    "mr": frozenset({"modality", "normalize", "lower", "upper"}),
    "xray": frozenset({"modality"}),
}


class ScaleToUnitd(MapTransform):
    """Bring intensities to [0, 1]: 8-bit data divided by 255, anything else min-max scaled."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source_dtype = img.dtype
            img = torch.as_tensor(img).float()
            if source_dtype in (np.uint8, torch.uint8):
                img = img / 255.0
            else:
                lo, hi = img.min(), img.max()
                img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
            d[key] = img
        return d


class DicomDisplayd(MapTransform):
    """Show a projection radiograph as a reader would: apply the DICOM VOI LUT (or window) kept
    in the image's metadata by :class:`~medsec.data.dicom.DicomReader` (pydicom's
    ``apply_voi_lut``), then invert ``MONOCHROME1`` images so that high values are bright. Images
    without DICOM attributes (PNG, NIfTI, arrays) pass unchanged."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor) or not img.meta.get("dicom"):
                continue
            attributes = dicom_attributes(img.meta)
            values = img.detach().cpu().numpy()
            if "VOILUTSequence" in attributes or "WindowCenter" in attributes:
                values = apply_voi_lut(values, attributes)
            values = np.asarray(values, dtype=np.float32)
            if attributes.get("PhotometricInterpretation") == "MONOCHROME1":
                values = values.max() + values.min() - values
            d[key] = MetaTensor(torch.as_tensor(values), meta=img.meta)
        return d


def _number(intensity: Mapping[str, Any], name: str) -> float:
    try:
        return float(intensity[name])
    except (TypeError, ValueError):
        raise ConfigError(f"data.intensity.{name} must be a number, got {intensity[name]!r}") from None


def ct_window(intensity: Mapping[str, Any]) -> tuple[float, float]:
    """The (level, width) in HU of a CT intensity config: a preset ``window`` or ``level`` and ``width``."""
    window = intensity.get("window")
    if window is not None:
        if "level" in intensity or "width" in intensity:
            raise ConfigError("data.intensity: give a CT window preset or level/width, not both")
        if window not in WINDOWS:
            raise ConfigError(f"data.intensity.window must be one of {sorted(WINDOWS)}, got {window!r}")
        return WINDOWS[window]
    if "level" not in intensity or "width" not in intensity:
        raise ConfigError(f"data.intensity: CT needs a window preset ({', '.join(sorted(WINDOWS))}) or level and width")
    level, width = _number(intensity, "level"), _number(intensity, "width")
    if width <= 0:
        raise ConfigError(f"data.intensity.width must be positive, got {width}")
    return level, width


def intensity_modality(intensity: Mapping[str, Any] | None) -> str | None:
    """The checked ``modality`` of an intensity config (``None`` for the default scaling)."""
    if not intensity:
        return None
    modality = intensity.get("modality")
    if modality not in OPTIONS:
        raise ConfigError(f"data.intensity.modality must be one of {sorted(OPTIONS)}, got {modality!r}")
    unknown = sorted(set(intensity) - OPTIONS[modality])
    if unknown:
        raise ConfigError(f"data.intensity: {unknown} do not apply to modality {modality} "
                          f"(it takes {sorted(OPTIONS[modality])})")
    return modality


def intensity_transforms(intensity: Mapping[str, Any] | None, key: str = "image") -> list[MapTransform]:
    """The transforms that bring ``key`` to network intensities as ``intensity`` says (module doc)."""
    modality = intensity_modality(intensity)
    if modality is None:
        return [ScaleToUnitd(key)]
    if modality == "ct":
        level, width = ct_window(intensity)
        return [ScaleIntensityRanged(key, a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0,
                                     clip=True, dtype=np.float32)]
    if modality == "xray":
        return [DicomDisplayd(key), ScaleToUnitd(key)]
    normalize = intensity.get("normalize", "percentiles")
    if normalize == "zscore":
        if "lower" in intensity or "upper" in intensity:
            raise ConfigError("data.intensity: lower/upper apply to normalize=percentiles only")
        return [NormalizeIntensityd(key, channel_wise=True)]
    if normalize != "percentiles":
        raise ConfigError(f"data.intensity.normalize must be 'percentiles' or 'zscore', got {normalize!r}")
    lower, upper = _number({"lower": intensity.get("lower", 0.5)}, "lower"), \
        _number({"upper": intensity.get("upper", 99.5)}, "upper")
    if not 0 <= lower < upper <= 100:
        raise ConfigError(f"data.intensity: need 0 <= lower < upper <= 100, got {lower} and {upper}")
    return [ScaleIntensityRangePercentilesd(key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True,
                                            channel_wise=True)]
