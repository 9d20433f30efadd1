"""Tiny fake data sets written into a test's ``tmp_path``."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def shared_data(name: str) -> Path:
    """``$MEDSEC_DATA_DIR/name`` or ``../shared/data/name`` beside the project; skip the test when absent."""
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    path = Path(os.environ.get("MEDSEC_DATA_DIR") or default) / name
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set MEDSEC_DATA_DIR or provide ../shared/data)")
    return path


LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


def write_decathlon(root: Path, cases: int = 10, shape: Sequence[int] = (12, 16, 8), labels: dict | None = None,
                    affine: np.ndarray | None = None, seed: int = 0) -> Path:
    """A Decathlon task folder: ``dataset.json`` and ``cases`` image/label NIfTI pairs. Each label
    holds a block of class 1 and one of class 2; the image is brighter there, plus noise."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    training = []
    for i in range(cases):
        label = np.zeros(shape, dtype=np.uint8)
        x0, y0 = rng.integers(1, 3), rng.integers(1, 4)
        label[x0:x0 + 4, y0:y0 + 5, 2:6] = 1
        label[x0 + 5:x0 + 9, y0 + 5:y0 + 10, 2:6] = 2
        image = (40 * label + rng.normal(50, 5, shape)).astype(np.float32)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    spec = {"name": "Fake", "modality": {"0": "MRI"}, "labels": labels or LABELS, "numTraining": cases,
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"]


def gradient(shape: Sequence[int], high: int = 255) -> np.ndarray:
    """A horizontal ramp from 0 to ``high`` (so min-max scaling is well defined)."""
    row = np.linspace(0, high, shape[1])
    return np.broadcast_to(row, tuple(shape[:2])).copy()


def write_npz(
    path: Path,
    counts: Sequence[int] = (6, 3, 3),
    num_classes: int = 2,
    label_shape: str = "(N,1)",
    rgb: bool = False,
    size: int = 28,
    drop: str | None = None,
) -> Path:
    """A MedMNIST-like ``.npz``: uint8 images, labels ``(N,)``, ``(N,1)`` or multi-label ``(N,C)``.

    ``drop`` leaves one key out. Label ``i % num_classes`` for sample ``i``.
    """
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        index = np.arange(n) % num_classes
        if label_shape == "(N,)":
            labels = index.astype(np.uint8)
        elif label_shape == "(N,1)":
            labels = index.astype(np.uint8)[:, None]
        else:  # multi-label
            labels = (rng.random((n, num_classes)) < 0.5).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    arrays.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_png(path: Path, size: int = 20, rgb: bool = False) -> Path:
    """An 8-bit grey (or RGB) PNG/JPEG (format from the suffix)."""
    pixels = gradient((size, size)).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("RGB") if rgb else image).save(path)
    return path


def dicom_dataset(pixels: np.ndarray, sop_class: str = SecondaryCaptureImageStorage, **attributes: object) -> pydicom.Dataset:
    """A single-frame DICOM data set of unsigned or signed integer ``pixels`` (rows, columns), with
    a patient, study and series, a plane at the origin (``attributes`` override any of it)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "OT", "P0", "Test^Patient", "", "O"
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "20260101", "120000", "", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "medsec tests"
    ds.Rows, ds.Columns = pixels.shape
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.PixelSpacing = [1, 1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    return ds


def save_dicom(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(path: Path, bits: int = 16, size: int = 20) -> Path:
    """A MONOCHROME2 secondary-capture DICOM with 8- or 16-bit unsigned pixels."""
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = gradient((size, size), high=255 if bits == 8 else 4000).astype(dtype)
    return save_dicom(dicom_dataset(pixels), path)


def write_nifti(path: Path, size: int = 20) -> Path:
    """A 2D float32 NIfTI image (``.nii`` or ``.nii.gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(gradient((size, size), high=1000).astype(np.float32), np.eye(4)), path)
    return path


def write_nih(root: Path, rows: Sequence[Sequence[str]], images: bool = True, csv_name: str = "") -> Path:
    """A ChestX-ray14 folder: ``Data_Entry_2017.csv`` with ``rows`` of (image, findings, patient, view)
    and, when ``images``, one small PNG per row in ``root/images``."""
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / (csv_name or "Data_Entry_2017.csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_COLUMNS)
        for name, findings, patient, view in rows:
            writer.writerow([name, findings, 0, patient, view])
    if images:
        for name, *_ in rows:
            write_png(root / "images" / name, size=8)
    return csv_path


def nih_rows(patients: int = 10, per_patient: int = 2) -> list[tuple[str, str, str, str]]:
    """NIH-style rows: patient p has ``per_patient`` images, alternating findings and views."""
    findings = ["No Finding", "Cardiomegaly", "Atelectasis|Effusion", "Hernia"]
    return [
        (f"{p:08d}_{k:03d}.png", findings[(p + k) % len(findings)], str(p), "PA" if k % 2 == 0 else "AP")
        for p in range(1, patients + 1)
        for k in range(per_patient)
    ]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A plain CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_class_folders(root: Path, per_class: int = 10) -> Path:
    """``root/<class>/...`` for FolderSource: PNGs, JPEGs in a subfolder, a DICOM and a NIfTI file
    in a third class, and what must be ignored (a text file, an empty folder)."""
    for i in range(per_class):
        write_png(root / "normal" / f"n{i}.png", size=8)
        write_png(root / "pneumonia" / "sub" / f"p{i}.jpg", size=8)
    write_dicom(root / "zz_dicom" / "d0.dcm", size=8)
    write_nifti(root / "zz_dicom" / "v0.nii.gz", size=8)
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def write_data_dir(root: Path) -> Path:
    """Tiny stand-ins for every real data set the configs name, laid out as in ``../shared/data``
    (``paths.data_dir=ROOT``): PneumoniaMNIST and BreastMNIST ``.npz`` files, an NIH ChestX-ray14
    sample of 10 patients (8 of its images with an NIH box list, ``bbox_1024px.csv``), and an MSD hippocampus task of 10 cases big enough for the recipes' crops."""
    write_npz(root / "pneumoniamnist" / "pneumoniamnist.npz", counts=(8, 4, 4))
    write_npz(root / "breastmnist" / "breastmnist.npz", counts=(8, 4, 4))
    write_nih(root / "nih_cxr14_sample", nih_rows(patients=10))
    boxes = [(name, "Nodule" if i % 2 else "Mass", 128 + 16 * i, 256, 384, 512)
             for i, (name, *_) in enumerate(nih_rows(patients=10)[:8])]
    write_csv(root / "nih_cxr14_sample" / "bbox_1024px.csv", ["image", "finding", "x", "y", "w", "h"], boxes)
    write_decathlon(root / "msd_hippocampus", cases=10, shape=(40, 56, 40))
    return root


OBLIQUE = (0.0, 0.8, -0.6, 0.0, 0.6, 0.8)
"""A slice orientation (row direction, then column direction) tilted about the x axis."""


def write_dicom_series(folder: Path, hu: np.ndarray, spacing: Sequence[float] = (0.8, 0.7), step: float = 2.5,
                       origin: Sequence[float] = (-20.0, -15.0, 30.0), orientation: Sequence[float] = OBLIQUE,
                       slope: float = 2.0, intercept: float = -1024.0, seed: int = 0) -> list[Path]:
    """A CT series of the volume ``hu`` (rows, columns, slices; Hounsfield units, stored as int16
    through ``slope`` and ``intercept``). Slice k lies at ``origin + k * step * normal``; file
    names and instance numbers follow a random order, not the position."""
    normal = np.cross(orientation[:3], orientation[3:])
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(hu.shape[2])
    paths = []
    for k in range(hu.shape[2]):
        stored = np.rint((hu[..., k] - intercept) / slope).astype(np.int16)
        ds = dicom_dataset(stored, CTImageStorage, Modality="CT", SeriesInstanceUID=series, StudyInstanceUID=study,
                           FrameOfReferenceUID=frame, InstanceNumber=int(order[k]) + 1,
                           ImagePositionPatient=[float(v) for v in np.asarray(origin) + k * step * normal],
                           ImageOrientationPatient=[float(v) for v in orientation], PixelSpacing=list(spacing),
                           SliceThickness=step, RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="HU")
        paths.append(save_dicom(ds, folder / f"slice{order[k]:03d}.dcm"))
    return paths


def write_image_masks(root: Path, count: int = 12, size: int = 16) -> Path:
    """``root/pairs.csv`` (image, mask, split) listing ``count`` grey PNG images, each with a PNG
    mask of one bright square (value 1), 2/3 train and 1/6 val and test each."""
    rows = []
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[2 + i % 4:8 + i % 4, 3:9] = 1
        image = (60 + 150 * mask + np.random.default_rng(i).integers(0, 30, mask.shape)).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        split = "train" if i < 2 * count // 3 else "val" if i < 5 * count // 6 else "test"
        rows.append([f"images/{i}.png", f"masks/{i}.png", split])
    return write_csv(root / "pairs.csv", ["image", "mask", "split"], rows)
