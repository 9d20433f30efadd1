"""Modality-aware intensities and the DICOM reader: HU whatever the file format, windows, MONOCHROME1,
series order and geometry, and errors that name the file."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsec.data.inputs import find_inputs
from medsec.data.intensity import WINDOWS, intensity_transforms
from medsec.data.segmentation import segmentation_transforms
from medsec.data.transforms import LoadImageNamed, classification_transforms
from medsec.errors import ConfigError, DataError

from .fakes import OBLIQUE, dicom_dataset, gradient, save_dicom, write_dicom_series

SLOPE, INTERCEPT = 2.0, -1024.0


def hu_volume(shape: tuple[int, int, int] = (12, 16, 6)) -> np.ndarray:
    """HU values from air to bone that the int16 DICOM encoding (slope 2, intercept -1024) holds exactly."""
    return INTERCEPT + SLOPE * np.random.default_rng(0).integers(0, 1100, shape).astype(np.float64)


def series_world(paths_affine: np.ndarray, voxel: tuple[int, int, int]) -> np.ndarray:
    """RAS world position of ``voxel`` (row, column, slice) under an affine."""
    return (paths_affine @ np.array([*voxel, 1.0]))[:3]


def dicom_world(voxel: tuple[int, int, int], spacing=(0.8, 0.7), step=2.5, origin=(-20.0, -15.0, 30.0),
                orientation=OBLIQUE) -> np.ndarray:
    """The DICOM definition (PS3.3 C.7.6.2.1.1) of where pixel (row r, column c) of slice k lies, in RAS."""
    r, c, k = voxel
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lps = np.asarray(origin) + c * spacing[1] * row_dir + r * spacing[0] * col_dir + k * step * np.cross(row_dir, col_dir)
    return lps * np.array([-1, -1, 1])


def test_series_is_ordered_by_position_and_placed_as_dicom_says(tmp_path: Path) -> None:
    hu = hu_volume()
    files = write_dicom_series(tmp_path / "ct", hu)  # file names and instance numbers shuffled
    image = LoadImageNamed("image")({"image": [str(p) for p in sorted(files)]})["image"]
    assert image.shape == (1, *hu.shape)
    np.testing.assert_array_equal(image[0].numpy(), hu)  # HU: slope and intercept applied, slices in place
    for voxel in [(0, 0, 0), (11, 0, 0), (0, 15, 0), (3, 7, 5), (11, 15, 5)]:
        np.testing.assert_allclose(series_world(image.affine.numpy(), voxel), dicom_world(voxel), atol=1e-4)


def test_ct_window_is_the_same_from_dicom_and_nifti(tmp_path: Path) -> None:
    hu = hu_volume()
    files = write_dicom_series(tmp_path / "ct", hu)
    nifti = tmp_path / "ct.nii.gz"
    affine = LoadImageNamed("image")({"image": [str(p) for p in files]})["image"].affine.numpy()
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), nifti)
    level, width = WINDOWS["lung"]
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
    pipeline = segmentation_transforms(train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=3,
                                       intensity={"modality": "ct", "window": "lung"}, labelled=False)
    from_dicom = pipeline({"image": [str(p) for p in files], "id": "dicom"})
    from_nifti = pipeline({"image": str(nifti), "id": "nifti"})
    np.testing.assert_allclose(from_dicom["image"][0].numpy(), expected, atol=1e-6)
    torch.testing.assert_close(from_dicom["image"], from_nifti["image"])
    torch.testing.assert_close(from_dicom["affine"], from_nifti["affine"], atol=1e-5, rtol=0)
    # one slice through the classification pipeline, with a level/width window
    one = classification_transforms(train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=2,
                                    intensity={"modality": "ct", "level": 40, "width": 400}, labelled=False)
    nib.save(nib.Nifti1Image(hu[..., 2].astype(np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    by_position = sorted(files, key=lambda p: float(np.asarray(
        LoadImageNamed("image")({"image": str(p)})["image"].affine)[2, 3]))
    slice_two = one({"image": str(by_position[2])})["image"]
    np.testing.assert_allclose(slice_two[0].numpy(), np.clip((hu[..., 2] + 160) / 400, 0, 1), atol=1e-6)
    torch.testing.assert_close(slice_two, one({"image": str(tmp_path / "slice.nii.gz")})["image"])


def xray(path: Path, photometric: str, **attributes: object) -> Path:
    pixels = gradient((16, 16), high=4000).astype(np.uint16)
    return save_dicom(dicom_dataset(pixels, Modality="DX", PhotometricInterpretation=photometric, **attributes), path)


def test_monochrome1_is_inverted_and_the_voi_window_applied(tmp_path: Path) -> None:
    pipeline = classification_transforms(train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=2,
                                         intensity={"modality": "xray"}, labelled=False)
    plain = pipeline({"image": str(xray(tmp_path / "m2.dcm", "MONOCHROME2"))})["image"]
    inverted = pipeline({"image": str(xray(tmp_path / "m1.dcm", "MONOCHROME1"))})["image"]
    np.testing.assert_allclose(plain[0, 0].numpy(), np.linspace(0, 1, 16), atol=1e-3)  # brighter to the right
    torch.testing.assert_close(inverted, 1 - plain)
    # a VOI window over the middle of the ramp: darker half black, brighter half white, linear between
    windowed = pipeline({"image": str(xray(tmp_path / "w.dcm", "MONOCHROME2", WindowCenter=2000, WindowWidth=800))})
    ramp = windowed["image"][0, 0].numpy()
    stored = gradient((16, 16), high=4000).astype(np.uint16)[0].astype(float)
    np.testing.assert_allclose(ramp, np.clip((stored - 1600) / 800, 0, 1), atol=0.01)
    # without the xray intensity, today's min-max scaling: MONOCHROME1 stays as stored
    default = classification_transforms(train=False, reader=LoadImageNamed("image"), in_channels=1, spatial_dims=2,
                                        labelled=False)
    torch.testing.assert_close(default({"image": str(tmp_path / "m1.dcm")})["image"], plain)
    # a DICOM file without a suffix, as scanners export them, is read the same way
    bare = (tmp_path / "m1.dcm").rename(tmp_path / "IM0001")
    torch.testing.assert_close(pipeline({"image": str(bare)})["image"], inverted)


def test_mr_normalisations() -> None:
    image = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 100)
    percentiles = intensity_transforms({"modality": "mr", "normalize": "percentiles", "lower": 10, "upper": 90})[0]
    scaled = percentiles({"image": image})["image"]
    assert float(scaled.min()) == 0 and float(scaled.max()) == 1 and float(scaled[0, 5, 0]) == pytest.approx(0.5, abs=1e-3)
    zscored = intensity_transforms({"modality": "mr", "normalize": "zscore"})[0]({"image": image})["image"]
    assert abs(float(zscored.mean())) < 1e-5 and float(zscored.std(unbiased=False)) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(("intensity", "message"), [
    ({"modality": "pet"}, "modality must be one of"),
    ({"modality": "ct", "window": "brain"}, "window must be one of"),
    ({"modality": "ct"}, "CT needs a window preset"),
    ({"modality": "ct", "window": "lung", "width": 3}, "not both"),
    ({"modality": "ct", "level": 40, "width": 0}, "width must be positive"),
    ({"modality": "mr", "window": "lung"}, r"\['window'\] do not apply to modality mr"),
    ({"modality": "mr", "normalize": "percentiles", "lower": 90, "upper": 10}, "lower < upper"),
])
def test_bad_intensity_configs_are_named(intensity: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        intensity_transforms(intensity)


def test_damaged_and_missing_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"input not found: {tmp_path / 'nope'}"):
        find_inputs(tmp_path / "nope", spatial_dims=2)
    folder = tmp_path / "scans"
    xray(folder / "good.dcm", "MONOCHROME2")
    broken = folder / "broken.dcm"
    broken.write_bytes((folder / "good.dcm").read_bytes()[:300])  # cut inside the header
    with pytest.raises(DataError, match=f"DICOM file {broken} has no image"):
        find_inputs(folder, spatial_dims=2)
    broken.write_text("not DICOM at all")
    with pytest.raises(DataError, match=f"cannot read DICOM file {broken}"):
        find_inputs(folder, spatial_dims=2)
    truncated = xray(tmp_path / "cut.dcm", "MONOCHROME2")
    truncated.write_bytes(truncated.read_bytes()[:-100])  # pixel data shorter than Rows x Columns
    with pytest.raises(DataError, match=f"DICOM file {truncated}"):
        LoadImageNamed("image")({"image": str(truncated)})
