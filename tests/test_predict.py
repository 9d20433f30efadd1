"""`medsec predict` end to end: eval's probabilities on the same images, a DICOM series back as NIfTI
and DICOM SEG on the series' grid, encrypted stores and sealed outputs, denoised images in the input's
format, and bad inputs named."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image

from medsec.errors import DataError
from tests.conftest import medsec_cli, run_verb
from tests.data.fakes import (
    OBLIQUE,
    write_csv,
    write_decathlon,
    write_dicom,
    write_dicom_series,
    write_nifti,
    write_png,
)
from tests.data.test_intensity import dicom_world, hu_volume
from tests.test_segmentation_run import TINY_UNET3D

QUIET = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
FOLDER = ["data=folder", "data.image_size=24", "data.num_workers=0", "data.batch_size=8", "model.net.width=4",
          "trainer.max_epochs=1", *QUIET]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A classifier trained one epoch on class folders of PNG, DICOM and NIfTI files."""
    base = tmp_path_factory.mktemp("predict_folder")
    root = base / "images"
    for cls in ("normal", "abnormal"):
        for i in range(6):
            write_png(root / cls / f"{i}.png", size=20 + i)
            write_dicom(root / cls / f"{i}.dcm")
            write_nifti(root / cls / f"{i}.nii.gz")
    run_verb("train", [*FOLDER, f"data.source.root={root}"], base / "run")
    return {"root": root, "ckpt": base / "run" / "checkpoints" / "best.ckpt", "base": base}


def predictions(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "predictions.csv", dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_predict_reproduces_eval_on_the_same_images(folder_run: dict[str, Path], tmp_path: Path) -> None:
    run_verb("eval", [f"ckpt_path={folder_run['ckpt']}", "callbacks.rich_progress_bar=null"], tmp_path / "eval")
    evaluated = predictions(tmp_path / "eval")
    result = run_verb("predict", [f"ckpt_path={folder_run['ckpt']}", f"input={folder_run['root']}"], tmp_path / "p")
    assert result == {"inputs": 36, "problem": "classification", "files": ["predictions.csv"]}
    predicted = predictions(tmp_path / "p").set_index("id")
    assert list(predicted.columns) == ["prob_abnormal", "prob_normal", "predicted"]  # the checkpoint's class names
    assert len({Path(i).suffix for i in evaluated["id"]}) >= 2  # several formats in the test split
    probs = ["prob_abnormal", "prob_normal"]
    pd.testing.assert_frame_equal(predicted.loc[evaluated["id"], probs].reset_index(drop=True),
                                  evaluated[probs].reset_index(drop=True))  # the same digits
    values = predicted[probs].astype(float).to_numpy()
    assert np.allclose(values.sum(1), 1, atol=1e-5)
    assert list(predicted["predicted"]) == [probs[k].removeprefix("prob_") for k in values.argmax(1)]


def test_csv_lists_inputs_and_a_missing_one_is_named(folder_run: dict[str, Path], tmp_path: Path) -> None:
    root = folder_run["root"]
    listing = write_csv(root / "some.csv", ["image"], [["normal/0.png"], ["abnormal/3.dcm"]])
    run_verb("predict", [f"ckpt_path={folder_run['ckpt']}", f"input={listing}"], tmp_path / "p")
    assert list(predictions(tmp_path / "p")["id"]) == ["normal/0.png", "abnormal/3.dcm"]
    write_csv(root / "bad.csv", ["image"], [["normal/0.png"], ["normal/missing.png"]])
    with pytest.raises(DataError, match=r"bad.csv line 3, column 'image': input not found: .*normal/missing.png"):
        run_verb("predict", [f"ckpt_path={folder_run['ckpt']}", f"input={root / 'bad.csv'}"], tmp_path / "q")


@pytest.mark.parametrize("case", ["3d", "two_channels", "corrupt_dicom", "missing"])
def test_inputs_that_do_not_fit_are_named(folder_run: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = tmp_path / "in" / {"3d": "volume.nii.gz", "two_channels": "la.png", "corrupt_dicom": "x.dcm",
                              "missing": "gone.png"}[case]
    path.parent.mkdir()
    if case == "3d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), path)
        message = "a 3D image of shape .* but the model takes 2D images"
    elif case == "two_channels":
        Image.new("LA", (16, 16)).save(path)
        message = "cannot turn a 2-channel image into 1 channels"
    elif case == "corrupt_dicom":
        path.write_bytes(write_dicom(tmp_path / "good.dcm").read_bytes()[:-50])
        message = "cannot read the pixels of DICOM file"
    else:
        message = "input not found"
    with pytest.raises(DataError, match=message) as err:
        run_verb("predict", [f"ckpt_path={folder_run['ckpt']}", f"input={path}"], tmp_path / "out")
    assert str(path) in str(err.value)


@pytest.mark.slow
def test_command_line_error_is_one_line(folder_run: dict[str, Path], tmp_path: Path) -> None:
    result = medsec_cli("predict", f"ckpt_path={folder_run['ckpt']}", f"input={tmp_path / 'nothing.png'}",
                        f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert f"input not found: {tmp_path / 'nothing.png'}" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_encrypted_store_input_gives_sealed_predictions(folder_run: dict[str, Path], tmp_path: Path) -> None:
    key, stores = tmp_path / "site.key", tmp_path / "stores"
    refs = [f"crypto.key.file={key}", f"paths.store_dir={stores}"]
    run_verb("encrypt", ["action=keygen", *refs], tmp_path / "keygen")
    summary = run_verb("encrypt", [*FOLDER[:1], f"data.source.root={folder_run['root']}", *refs], tmp_path / "enc")
    ckpt = f"ckpt_path={folder_run['ckpt']}"
    run_verb("predict", [ckpt, f"input={summary['store']}", "split=test", "crypto=aes", *refs], tmp_path / "sealed")
    assert (tmp_path / "sealed" / "predictions.csv.enc").is_file()
    assert not (tmp_path / "sealed" / "predictions.csv").exists()
    plain = tmp_path / "opened.csv"
    run_verb("encrypt", ["action=decrypt", f"input={tmp_path / 'sealed' / 'predictions.csv.enc'}", f"output={plain}",
                         *refs], tmp_path / "dec")
    from_store = pd.read_csv(plain, dtype=str).set_index("id")
    assert len(from_store) == summary["records"]["test"]
    run_verb("predict", [ckpt, f"input={folder_run['root']}"], tmp_path / "files")
    from_files = predictions(tmp_path / "files").set_index("id")
    pd.testing.assert_frame_equal(from_store, from_files.loc[from_store.index])  # decrypted in memory: same images


@pytest.mark.slow
def test_the_checkpoint_carries_the_ct_window_to_predict(tmp_path: Path) -> None:
    """Trained on CT slices in HU (DICOM and NIfTI) with the lung window: predict repeats the window,
    so one slice gives the same probabilities from either format, and an MR scan is refused."""
    hu = hu_volume((16, 16, 24))
    root = tmp_path / "ct"
    for k in range(24):
        cls = "dense" if hu[..., k].mean() > hu.mean() else "clear"
        files = write_dicom_series(tmp_path / "series", hu[..., k:k + 1], seed=k)
        (root / cls).mkdir(parents=True, exist_ok=True)
        files[0].rename(root / cls / f"{k}.dcm")
        nib.save(nib.Nifti1Image(hu[..., k].astype(np.float32), np.eye(4)), root / cls / f"{k}.nii.gz")
    run_verb("train", [*FOLDER, f"data.source.root={root}", "data.intensity={modality:ct,window:lung}"], tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["medsec"]["data"]["intensity"]
    assert stored == {"modality": "ct", "window": "lung"}
    one = next((root / "dense").glob("*.dcm"))
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "slice.dcm").write_bytes(one.read_bytes())
    (pair / "slice.nii.gz").write_bytes(one.with_name(one.name.replace(".dcm", ".nii.gz")).read_bytes())
    run_verb("predict", [f"ckpt_path={ckpt}", f"input={pair}"], tmp_path / "p")
    rows = predictions(tmp_path / "p").set_index("id")
    pd.testing.assert_series_equal(rows.loc["slice.dcm"], rows.loc["slice.nii.gz"], check_names=False)
    mr = pydicom.dcmread(one)
    mr.Modality = "MR"
    mr.save_as(tmp_path / "mr.dcm")
    with pytest.raises(DataError, match=f"{tmp_path / 'mr.dcm'}.*DICOM modality MR, but the model was trained on ct"):
        run_verb("predict", [f"ckpt_path={ckpt}", f"input={tmp_path / 'mr.dcm'}"], tmp_path / "q")


def train_segmentation(base: Path, *overrides: str) -> Path:
    """A tiny 3D U-Net trained one epoch on a fake two-structure Decathlon task; its checkpoint."""
    root = write_decathlon(base / "Task99_Fake", cases=10)
    run_verb("train", ["experiment=hippocampus_unet3d", f"data.source.root={root}", "data.source.fold=0",
                       "data.pipeline.crop_size=[8,16,8]", "task.roi_size=[8,16,8]", *TINY_UNET3D, *overrides],
             base / "run")
    return base / "run" / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_segmentation(tmp_path_factory.mktemp("predict_seg"))


def series_affine() -> np.ndarray:
    """The RAS affine of the fake series, from where DICOM says its voxels lie."""
    origin = dicom_world((0, 0, 0))
    affine = np.eye(4)
    for axis in range(3):
        affine[:3, axis] = dicom_world(tuple(int(a == axis) for a in range(3))) - origin
    affine[:3, 3] = origin
    return affine


def seg_label_map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A DICOM SEG's binary segments, placed by their frames' positions, as one label map."""
    seg = pydicom.dcmread(path)
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    origin = np.array([-20.0, -15.0, 30.0])
    labels = np.zeros(shape, np.uint8)
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = round(float((position - origin) @ normal) / 2.5)
        labels[..., k][frame.astype(bool)] = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
    return labels


@pytest.mark.slow
def test_dicom_series_comes_back_as_nifti_and_seg_on_its_grid(segmentation_run: Path, tmp_path: Path) -> None:
    hu = hu_volume((12, 16, 8))
    files = [path.rename(path.with_suffix("")) for path in write_dicom_series(tmp_path / "scan" / "ct", hu)]
    (tmp_path / "scan" / "ct" / "README.txt").write_text("not an image")  # what a DICOM export may hold beside
    result = run_verb("predict", [f"ckpt_path={segmentation_run}", f"input={tmp_path / 'scan'}"], tmp_path / "p")
    assert result["files"] == ["labels/scan.nii.gz", "labels/scan.seg.dcm"]
    saved = nib.load(tmp_path / "p" / "labels" / "scan.nii.gz")
    labels = np.asarray(saved.dataobj)
    assert saved.shape == hu.shape and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_allclose(saved.affine, series_affine(), atol=1e-4)

    seg = pydicom.dcmread(tmp_path / "p" / "labels" / "scan.seg.dcm")
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 8 * 2  # every slice, for both structures
    assert (seg.Rows, seg.Columns) == (12, 16)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.8, 0.7])
    np.testing.assert_allclose(float(shared.PixelMeasuresSequence[0].SliceThickness), 2.5)
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], OBLIQUE)
    positions = {tuple(np.round([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], 3))
                 for f in seg.PerFrameFunctionalGroupsSequence}
    assert positions == {tuple(np.round(pydicom.dcmread(f).ImagePositionPatient, 3)) for f in files}
    np.testing.assert_array_equal(seg_label_map(tmp_path / "p" / "labels" / "scan.seg.dcm", hu.shape), labels)

    # the same volume in HU as NIfTI gives the same label map
    nib.save(nib.Nifti1Image(hu.astype(np.float32), series_affine()), tmp_path / "ct.nii.gz")
    run_verb("predict", [f"ckpt_path={segmentation_run}", f"input={tmp_path / 'ct.nii.gz'}"], tmp_path / "n")
    from_nifti = nib.load(tmp_path / "n" / "labels" / "ct.nii.gz")
    np.testing.assert_array_equal(np.asarray(from_nifti.dataobj), labels)
    assert not (tmp_path / "n" / "labels" / "ct.seg.dcm").exists()


@pytest.mark.slow
def test_denoised_images_keep_the_input_format(tmp_path: Path) -> None:
    run_verb("train", ["experiment=denoising_synthetic", "data.source.num_samples=[32,8,8]", "data.source.image_size=16",
                       "model.net.depth=3", "model.net.features=8", "trainer.max_epochs=1", *QUIET], tmp_path / "run")
    inputs = tmp_path / "in"
    write_png(inputs / "a.png", size=16)
    write_dicom(inputs / "b.dcm", size=16)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), affine), inputs / "c.nii.gz")
    result = run_verb("predict", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", f"input={inputs}"],
                      tmp_path / "p")
    assert result["files"] == ["denoised/a.png", "denoised/b.dcm", "denoised/c.nii.gz"]
    assert Image.open(tmp_path / "p" / "denoised" / "a.png").size == (16, 16)
    original, denoised = pydicom.dcmread(inputs / "b.dcm"), pydicom.dcmread(tmp_path / "p" / "denoised" / "b.dcm")
    assert denoised.pixel_array.shape == (16, 16) and denoised.pixel_array.dtype == original.pixel_array.dtype
    assert denoised.SeriesInstanceUID != original.SeriesInstanceUID and denoised.StudyInstanceUID == original.StudyInstanceUID
    volume = nib.load(tmp_path / "p" / "denoised" / "c.nii.gz")
    assert volume.shape == (16, 16) and np.allclose(volume.affine, affine)
    assert 0 <= float(np.min(volume.dataobj)) and float(np.max(volume.dataobj)) <= 1


@pytest.mark.slow
def test_a_reorienting_pipeline_is_undone(tmp_path: Path) -> None:
    """A model whose pipeline reorients to RAS: one volume stored in two voxel orders gives label maps
    that are the same voxel-order change of each other, each on its own input's grid."""
    ckpt = train_segmentation(tmp_path / "train", "data.pipeline.orientation=RAS")
    hu = hu_volume((12, 16, 8))
    affine = np.array([[1.5, 0, 0, -9], [0, 1, 0, 4], [0, 0, 2, 1], [0, 0, 0, 1]])
    flip_swap = np.array([[0, -1, 0, 11], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # (j, i, k) -> (11 - i, j, k)
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), tmp_path / "ras.nii.gz")
    other = np.ascontiguousarray(hu[::-1].transpose(1, 0, 2))
    nib.save(nib.Nifti1Image(other.astype(np.float32), affine @ flip_swap), tmp_path / "other.nii.gz")
    for name in ("ras", "other"):
        run_verb("predict", [f"ckpt_path={ckpt}", f"input={tmp_path / f'{name}.nii.gz'}"], tmp_path / name)
    ras = nib.load(tmp_path / "ras" / "labels" / "ras.nii.gz")
    swapped = nib.load(tmp_path / "other" / "labels" / "other.nii.gz")
    assert swapped.shape == other.shape and np.allclose(swapped.affine, affine @ flip_swap)
    assert len(np.unique(np.asarray(ras.dataobj))) > 1
    np.testing.assert_array_equal(np.asarray(swapped.dataobj), np.asarray(ras.dataobj)[::-1].transpose(1, 0, 2))
