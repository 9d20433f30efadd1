"""`medsec train` / `medsec eval` for segmentation end to end: synthetic 2D, a fake and the real
Decathlon folder (the real one skips when absent)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import read_metrics, run_verb
from tests.data.fakes import shared_data, write_decathlon

QUIET = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
SYNTHETIC = ["experiment=synthetic_unet2d", "data.source.num_samples=[48,8,8]", "data.source.image_size=16",
             "model.net.channels=[8,16]", "model.net.strides=[2]", "task.roi_size=16", "trainer.max_epochs=2",
             *QUIET]
TINY_UNET3D = ["model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0",
               "trainer.max_epochs=1", "trainer.max_time=null", "data.batch_size=2", *QUIET]
AFFINE = np.array([[0.0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1]])
DICE_KEYS = {"val/dice_mean", "val/dice_mean_best", "test/dice_mean", "test/hd95_mm_mean", "test/loss", "train/loss"}


def test_synthetic_2d_train_then_eval(tmp_path: Path) -> None:
    metrics = run_verb("train", SYNTHETIC, tmp_path / "train")
    assert DICE_KEYS | {"test/dice_disc", "test/dice_ring", "test/hd95_mm_disc", "val/dice_ring"} <= set(metrics)
    assert read_metrics(tmp_path / "train") == metrics
    assert 0.0 <= metrics["test/dice_mean"] <= 1.0
    predictions = sorted((tmp_path / "train" / "predictions").iterdir())
    assert len(predictions) == 8
    saved = nib.load(predictions[0])
    assert saved.shape == (16, 16) and np.allclose(saved.affine, np.eye(4))
    assert len(list((tmp_path / "train" / "overlays").glob("*.png"))) == 4

    ckpt = tmp_path / "train" / "checkpoints" / "best.ckpt"
    evaluated = run_verb("eval", [f"ckpt_path={ckpt}", "callbacks.rich_progress_bar=null"], tmp_path / "eval")
    for key in ("test/dice_mean", "test/dice_disc", "test/hd95_mm_mean"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key
    for a, b in zip(predictions, sorted((tmp_path / "eval" / "predictions").iterdir())):
        np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))


def test_fake_decathlon_3d_keeps_the_affine(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "Task99_Fake", cases=10, affine=AFFINE)
    overrides = ["experiment=hippocampus_unet3d", f"data.source.root={root}", "data.source.fold=0",
                 "data.pipeline.crop_size=[8,16,8]", "task.roi_size=[8,16,8]", *TINY_UNET3D]
    metrics = run_verb("train", overrides, tmp_path / "run")
    assert DICE_KEYS | {"test/dice_anterior", "test/dice_posterior", "test/hd95_mm_posterior"} <= set(metrics)
    predictions = sorted((tmp_path / "run" / "predictions").iterdir())
    assert len(predictions) == 2  # fold 0 of 5
    for path in predictions:
        saved = nib.load(path)
        source = nib.load(root / "imagesTr" / path.name)
        assert saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, AFFINE)
        assert set(np.unique(np.asarray(saved.dataobj))) <= {0, 1, 2}
    assert (tmp_path / "run" / "overlays" / predictions[0].name.replace(".nii.gz", ".png")).is_file()


def test_hippocampus_real_cases(tmp_path: Path) -> None:
    root = shared_data("msd_hippocampus")
    overrides = ["experiment=hippocampus_unet3d", f"data.source.root={root}", "data.source.fold=null",
                 "data.source.max_cases=8", "data.source.fractions=[0.5,0.25,0.25]", *TINY_UNET3D]
    metrics = run_verb("train", overrides, tmp_path)
    assert {"test/dice_anterior", "test/dice_posterior", "test/hd95_mm_anterior", "test/hd95_mm_posterior"} <= set(metrics)
    for path in sorted((tmp_path / "predictions").iterdir()):
        source = nib.load(root / "imagesTr" / path.name)
        saved = nib.load(path)
        assert saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, source.affine)
