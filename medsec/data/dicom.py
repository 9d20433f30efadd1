"""DICOM in, DICOM out: one MONAI reader for single images and series, and DICOM SEG writing.

:class:`DicomReader` reads one file (a 2D image) or the files of one series (a 3D volume, slices
ordered by ``ImagePositionPatient`` along the slice normal, not by ``InstanceNumber``) with pydicom,
applies the modality LUT (``RescaleSlope``/``RescaleIntercept``: CT in Hounsfield units) and keeps
in the image's metadata (``meta["dicom"]``) the display attributes an intensity transform may need
(photometric interpretation, VOI window or LUT, modality). Arrays are indexed (row, column[, slice]),
with a RAS voxel-to-world affine. Files are untrusted: sizes are checked before pixels are decoded.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys
from pydicom.pixels import apply_modality_lut

from medsec.errors import DataError

MAX_VOXELS = 1 << 28
"""The most voxels one image or series may hold (checked from the headers before decoding)."""
MAX_SLICES = 4096
DICOM_SUFFIXES = (".dcm", ".dicom")
DISPLAY_TAGS = {
    "00080060": "Modality",
    "00280004": "PhotometricInterpretation",
    "00280101": "BitsStored",
    "00280103": "PixelRepresentation",
    "00281050": "WindowCenter",
    "00281051": "WindowWidth",
    "00281056": "VOILUTFunction",
    "00283010": "VOILUTSequence",
}
"""What ``meta["dicom"]`` keeps (DICOM JSON, first slice): what display transforms need."""
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                "AccessionNumber", "ReferringPhysicianName")
"""Type 2 attributes (required, may be empty) a DICOM SEG copies from its source images."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACING_TOLERANCE = 0.01


def is_dicom(path: str | Path) -> bool:
    """A DICOM file: by its suffix, or (no suffix) by the ``DICM`` marker after the preamble."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if "." in name or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def dicom_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """``paths`` as a list of files (one file, or the files of a series)."""
    return [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]


def read_header(path: str | Path) -> pydicom.Dataset:
    """The data set of ``path`` without its pixels; a :class:`DataError` naming it if it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types; all mean "not readable DICOM"
        raise DataError(f"cannot read DICOM file {path}: {type(err).__name__}: {err}") from None


def _vector(ds: pydicom.Dataset, name: str, size: int, path: Path) -> np.ndarray:
    value = getattr(ds, name, None)
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.empty(0)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise DataError(f"DICOM file {path}: {name} is missing or malformed ({value!r:.80})")
    return vector


def slice_normal(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """The unit normal of a slice: row direction x column direction (``ImageOrientationPatient``)."""
    orientation = _vector(ds, "ImageOrientationPatient", 6, path)
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"DICOM file {path}: ImageOrientationPatient is not two orthogonal unit vectors")
    return normal


def sort_slices(headers: Sequence[pydicom.Dataset], paths: Sequence[Path]) -> list[int]:
    """The order of a series' slices along the slice normal (by ``ImagePositionPatient``); refuses
    slices of different orientations and two slices at one position."""
    normal = slice_normal(headers[0], paths[0])
    reference = _vector(headers[0], "ImageOrientationPatient", 6, paths[0])
    for ds, path in zip(headers, paths):
        if not np.allclose(_vector(ds, "ImageOrientationPatient", 6, path), reference, atol=1e-4):
            raise DataError(f"DICOM series: {path} is oriented differently from {paths[0]}")
    positions = [float(_vector(ds, "ImagePositionPatient", 3, path) @ normal) for ds, path in zip(headers, paths)]
    order = sorted(range(len(paths)), key=positions.__getitem__)
    gaps = np.diff([positions[i] for i in order])
    if len(gaps) and gaps.min() <= 1e-6:
        first = int(np.argmin(gaps))
        raise DataError(f"DICOM series: {paths[order[first]]} and {paths[order[first + 1]]} are at the same position")
    if len(gaps) and np.ptp(gaps) > _SPACING_TOLERANCE * gaps.mean() + 1e-4:
        raise DataError(f"DICOM series of {paths[0].parent}: slices are unevenly spaced ({gaps.min():.3g} to "
                        f"{gaps.max():.3g} mm apart): missing slices?")
    return order


def dicom_affine(first: pydicom.Dataset, last: pydicom.Dataset | None, count: int, path: Path) -> np.ndarray:
    """The RAS affine of voxel (row, column, slice) for a series from ``first`` to ``last`` slice
    (``last=None``: one slice, unit step along the normal)."""
    orientation = _vector(first, "ImageOrientationPatient", 6, path)
    spacing = _vector(first, "PixelSpacing", 2, path) if "PixelSpacing" in first else np.ones(2)
    origin = _vector(first, "ImagePositionPatient", 3, path)
    step = slice_normal(first, path) if last is None or count < 2 else \
        (_vector(last, "ImagePositionPatient", 3, path) - origin) / (count - 1)
    lps = np.eye(4)
    lps[:3, 0] = orientation[3:] * spacing[0]  # down the rows: column direction x row spacing
    lps[:3, 1] = orientation[:3] * spacing[1]  # along a row: row direction x column spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def image_header(path: str | Path, slices: int = 1) -> pydicom.Dataset:
    """The header of ``path`` (read as in :func:`read_header`), checked to describe one frame of
    a grey image that, times ``slices``, stays under :data:`MAX_VOXELS`."""
    ds = read_header(path)
    _check_size(ds, Path(path), slices)
    return ds


def _check_size(ds: pydicom.Dataset, path: Path, slices: int = 1) -> None:
    try:
        dims = [int(ds.Rows), int(ds.Columns), int(getattr(ds, "NumberOfFrames", 1) or 1),
                int(getattr(ds, "SamplesPerPixel", 1) or 1)]
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"DICOM file {path} has no image (Rows/Columns missing or malformed)") from None
    if dims[2] != 1:
        raise DataError(f"DICOM file {path}: multi-frame images ({dims[2]} frames) are not supported; "
                        "give one file per slice")
    if min(dims) < 1 or int(np.prod(dims, dtype=np.int64)) * slices > MAX_VOXELS:
        raise DataError(f"DICOM file {path}: {dims[0]}x{dims[1]} pixels x {slices} slice(s) exceeds the "
                        f"limit of {MAX_VOXELS} voxels")


def _pixels(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    image_header(path)
    try:
        ds = pydicom.dcmread(path)
        array = apply_modality_lut(ds.pixel_array, ds)
    except Exception as err:  # noqa: BLE001 - damaged pixel data, unknown transfer syntax, ...
        raise DataError(f"cannot read the pixels of DICOM file {path}: {type(err).__name__}: {err}") from None
    return ds, np.array(array, dtype=np.float32 if array.dtype == np.float64 else array.dtype)  # writable


def display_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """The DICOM JSON of the attributes in :data:`DISPLAY_TAGS` that ``ds`` has."""
    wanted = pydicom.Dataset()
    for keyword in DISPLAY_TAGS.values():
        if keyword in ds:
            setattr(wanted, keyword, ds[keyword].value)
    return wanted.to_json_dict()


class DicomReader(ImageReader):
    """A MONAI image reader for DICOM files: one file is a 2D image, several files one series
    (see the module doc). Use with ``LoadImage(reader=DicomReader())``."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(is_dicom(name) for name in dicom_files(filename))

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> list[Path]:
        """The files to read (decoded in :meth:`get_data`)."""
        files = dicom_files(data)
        if not files or len(files) > MAX_SLICES:
            raise DataError(f"a DICOM series needs 1 to {MAX_SLICES} files, got {len(files)}")
        return files

    def get_data(self, img: list[Path]) -> tuple[np.ndarray, dict[str, Any]]:
        files = img
        if len(files) == 1:
            ds, array = _pixels(files[0])
            return array, self._meta(ds, None, array.shape, files[0])
        headers = [image_header(path, len(files)) for path in files]
        order = sort_slices(headers, files)
        slices = [_pixels(files[i]) for i in order]
        shapes = {array.shape for _, array in slices}
        if len(shapes) > 1:
            raise DataError(f"DICOM series of {files[0].parent}: slices differ in size {sorted(shapes)}")
        volume = np.stack([array for _, array in slices], axis=-1)
        return volume, self._meta(slices[0][0], slices[-1][0], volume.shape, files[order[0]])

    @staticmethod
    def _meta(first: pydicom.Dataset, last: pydicom.Dataset | None, shape: tuple[int, ...], path: Path) -> dict[str, Any]:
        if len(shape) == 3 and last is None:
            raise DataError(f"DICOM file {path}: colour images are not supported")
        affine = dicom_affine(first, last, shape[-1] if last is not None else 1, path) \
            if "ImageOrientationPatient" in first and "ImagePositionPatient" in first else np.eye(4)
        return {MetaKeys.AFFINE: affine, MetaKeys.ORIGINAL_AFFINE: affine.copy(), MetaKeys.SPATIAL_SHAPE: shape,
                MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
                "dicom": display_attributes(first)}


def dicom_attributes(meta: Mapping[str, Any]) -> pydicom.Dataset:
    """The DICOM attributes a reader kept in an image's metadata (``meta["dicom"]``), as a data set."""
    return pydicom.Dataset.from_json(dict(meta.get("dicom") or {}))


def series_sources(files: Sequence[str | Path]) -> list[pydicom.Dataset]:
    """The data sets (without pixels) of one image or series, in the order :class:`DicomReader`
    stacks them."""
    paths = dicom_files(files)
    headers = [read_header(path) for path in paths]
    order = sort_slices(headers, paths) if len(paths) > 1 else [0]
    return [headers[i] for i in order]


def _as_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seg_bytes(files: Sequence[str | Path], labels: np.ndarray, class_names: Sequence[str], model: str) -> bytes:
    """A DICOM SEG (binary segments, one per class, every frame kept) of the label map ``labels``
    (row, column[, slice]: values 0..K on the grid of the image or series in ``files``), written
    with highdicom and referencing those images."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medsec import __version__

    sources = series_sources(files)
    for ds in sources:  # type 2 attributes a SEG copies: present, if empty, in every valid source
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = np.asarray(labels, dtype=np.uint8)
    frames = np.moveaxis(frames, -1, 0) if frames.ndim == 3 else frames[None]
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise DataError(f"a label map of shape {labels.shape} does not fit the DICOM series of {Path(files[0]).parent}")
    algorithm = hd.AlgorithmIdentificationSequence(name=model[:64], version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, name in enumerate(class_names, start=1)]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medsec", manufacturer_model_name=model[:64],
            software_versions=__version__, device_serial_number="none", omit_empty_frames=False)
    except (AttributeError, ValueError, TypeError) as err:  # highdicom's word on what the sources lack
        raise DataError(f"cannot write a DICOM SEG for {Path(files[0]).parent}: {err}") from None
    return _as_bytes(seg)


def derived_image_bytes(path: str | Path, values: np.ndarray) -> bytes:
    """The 2D DICOM file ``path`` with its pixels replaced by ``values`` (in [0, 1], mapped back to
    the file's stored value range) as a new derived instance of a new series."""
    from pydicom.uid import generate_uid

    ds, _ = _pixels(Path(path))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    raw = ds.pixel_array
    low, high = float(raw.min()), float(raw.max())
    pixels = np.clip(np.rint(low + np.clip(values, 0, 1) * (high - low)), np.iinfo(raw.dtype).min,
                     np.iinfo(raw.dtype).max).astype(raw.dtype)
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = "denoised (medsec predict)"
    return _as_bytes(ds)
