"""`medsec train experiment=denoising_synthetic` then `medsec eval`: metrics per noise model and
level, the PNG grids, and a clear error for an unknown noise model."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from medsec.commands import train as train_verb
from medsec.errors import user_errors_exit
from medsec.utils.config import compose_config
from tests.conftest import read_metrics, run_verb

QUIET = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
TINY = ["experiment=denoising_synthetic", "data.source.num_samples=[48,16,16]", "data.source.image_size=16",
        "model.net.depth=3", "model.net.features=8", "trainer.max_epochs=1", *QUIET]
GRID_KEYS = {f"test/{prefix}{stat}_{entry}" for prefix in ("", "noisy_") for stat in ("psnr", "ssim", "mse")
             for entry in ("gaussian_0.05", "gaussian_0.15", "poisson_50")}


def test_train_then_eval_writes_metrics_per_noise_and_level(tmp_path: Path) -> None:
    metrics = run_verb("train", TINY, tmp_path / "train")
    assert GRID_KEYS | {"test/psnr", "test/ms_per_image", "val/psnr_best", "train/loss"} <= set(metrics)
    assert read_metrics(tmp_path / "train") == metrics
    assert metrics["test/noisy_psnr_gaussian_0.05"] > metrics["test/noisy_psnr_gaussian_0.15"] + 8
    pngs = sorted(p.name for p in (tmp_path / "train" / "denoising").glob("*.png"))
    assert pngs == ["gaussian_0.05.png", "gaussian_0.15.png", "poisson_50.png"]

    ckpt = tmp_path / "train" / "checkpoints" / "best.ckpt"
    evaluated = run_verb("eval", [f"ckpt_path={ckpt}", "callbacks.rich_progress_bar=null"], tmp_path / "eval")
    assert GRID_KEYS <= set(read_metrics(tmp_path / "eval"))
    for key in GRID_KEYS:
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key  # same seeded noise
    assert len(list((tmp_path / "eval" / "denoising").glob("*.png"))) == 3


def test_unknown_noise_model_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_config("train", [*TINY, "task.noise.name=salt"], output_dir=tmp_path)
    try:
        with pytest.raises(SystemExit) as stopped:
            user_errors_exit(train_verb.train)(cfg)  # what `medsec train` runs: one log line, exit status 2
    finally:
        GlobalHydra.instance().clear()
    assert stopped.value.code == 2
    assert "task.noise.name: unknown noise model 'salt'; choose one of ['gaussian', 'poisson', 'rician', " \
           "'speckle']" in caplog.text
