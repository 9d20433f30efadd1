"""DenoisingTask on tiny generated images: it learns, names its metrics, evaluates baselines alike."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from medsec.core.registry import register
from medsec.data.datamodule import MedicalDataModule
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import ConfigError
from medsec.models.baselines import GaussianFilter, NonLocalMeans, estimate_sigma
from medsec.tasks.denoising import DenoisingTask, accepted_arguments
from medsec.utils.outputs import OutputWriter

OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-3}
DNCNN = {"net": {"_target_": "medsec.models.denoisers.DnCNN", "depth": 4, "features": 16}}
NOISE = {"name": "gaussian", "levels": [0.1, 0.1]}
GRID = {"gaussian": [0.1], "speckle": [0.3]}


class OnlyChannels(nn.Module):
    """An image-to-image net that takes only ``in_channels`` (as a user's network might)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def datamodule() -> MedicalDataModule:
    source = SyntheticSource(num_samples=(64, 16, 16), image_size=24, noise=0.0, seed=1)
    return MedicalDataModule(source, batch_size=16, num_workers=0, augment=False)


def make_task(datamodule: MedicalDataModule, model: dict = DNCNN, **kwargs) -> DenoisingTask:
    return DenoisingTask(model=model, optimizer=OPTIMIZER, **({"noise": NOISE, "test_noise": GRID} | kwargs),
                         **datamodule.task_info())


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_training_beats_the_noisy_input_and_names_metrics(datamodule: MedicalDataModule, tmp_path: Path) -> None:
    L.seed_everything(0)
    task = make_task(datamodule, crop_size=16, patches_per_image=2)
    fit = trainer(max_epochs=8, limit_val_batches=1)
    fit.fit(task, datamodule=datamodule)
    losses = fit.callback_metrics
    assert {"train/loss", "val/loss", "val/psnr", "val/ssim", "val/mse", "val/psnr_best"} <= set(losses)
    trainer().test(task, datamodule=datamodule, verbose=False)
    m = {k: float(v) for k, v in task.trainer.callback_metrics.items()}
    for stat in ("psnr", "ssim", "mse"):
        assert {f"test/{stat}", f"test/{stat}_gaussian_0.1", f"test/noisy_{stat}_speckle_0.3"} <= set(m)
    assert m["test/noisy_psnr_gaussian_0.1"] == pytest.approx(20.0, abs=0.6)  # sigma 0.1 -> 20 dB
    assert m["test/psnr_gaussian_0.1"] > m["test/noisy_psnr_gaussian_0.1"] + 1  # 32 steps of a tiny DnCNN
    assert m["test/mse_gaussian_0.1"] < 0.8 * m["test/noisy_mse_gaussian_0.1"]
    assert m["test/ssim_gaussian_0.1"] > m["test/noisy_ssim_gaussian_0.1"]
    assert m["test/ms_per_image"] > 0

    task.save_test_outputs(tmp_path, OutputWriter(tmp_path))
    pngs = sorted(p.name for p in (tmp_path / "denoising").iterdir())
    assert pngs == ["gaussian_0.1.png", "speckle_0.3.png"]
    assert (tmp_path / "denoising" / pngs[0]).read_bytes()[:4] == b"\x89PNG"


def test_test_noise_is_reproducible(datamodule: MedicalDataModule) -> None:
    task = make_task(datamodule)
    runs = []
    for _ in range(2):
        trainer().test(task, datamodule=datamodule, verbose=False)
        runs.append(float(task.trainer.callback_metrics["test/noisy_psnr_speckle_0.3"]))
    assert runs[0] == runs[1]


def test_training_loss_goes_down(datamodule: MedicalDataModule) -> None:
    L.seed_everything(0)
    task = make_task(datamodule, loss="l1")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        clean = batch["image"]
        loss = task.loss_fn(task(task.corrupt(clean, task.train_noise)), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert isinstance(task.loss_fn, nn.L1Loss)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


@pytest.mark.parametrize("baseline", [GaussianFilter(sigma=1.0), NonLocalMeans()], ids=["gaussian", "nlm"])
def test_baselines_run_through_the_same_test(datamodule: MedicalDataModule, baseline: nn.Module) -> None:
    target = f"medsec.models.baselines.{type(baseline).__name__}"
    task = make_task(datamodule, model={"net": {"_target_": target}}, test_noise={"gaussian": [0.1]})
    trainer().test(task, datamodule=datamodule, verbose=False)
    m = {k: float(v) for k, v in task.trainer.callback_metrics.items()}
    assert m["test/psnr_gaussian_0.1"] > m["test/noisy_psnr_gaussian_0.1"] + 2


def test_estimated_sigma_matches_the_noise() -> None:
    rng = np.random.default_rng(0)
    smooth = np.add.outer(np.linspace(0.2, 0.7, 96), np.linspace(0.0, 0.2, 96))
    for sigma in (0.02, 0.08):
        assert estimate_sigma(smooth + rng.normal(0, sigma, smooth.shape)) == pytest.approx(sigma, rel=0.1)


def test_network_gets_only_the_data_arguments_it_takes(datamodule: MedicalDataModule) -> None:
    register("network", "tests.tasks.test_denoising.OnlyChannels")  # a network from outside medsec
    offered = {"in_channels": 1, "out_channels": 1, "spatial_dims": 2}
    assert accepted_arguments(OnlyChannels, offered) == {"in_channels": 1}
    assert accepted_arguments(nn.Identity, offered) == offered  # takes **kwargs
    task = make_task(datamodule, model={"net": {"_target_": "tests.tasks.test_denoising.OnlyChannels"}})
    assert task(torch.rand(2, 1, 24, 24)).shape == (2, 1, 24, 24)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "huber"}, "task.loss: unknown loss 'huber'"),
    ({"noise": {"name": "salt", "levels": 0.1}}, "task.noise.name: unknown noise model 'salt'"),
    ({"test_noise": {"pepper": [0.1]}}, "task.test_noise.pepper: task.noise.name: unknown noise model"),
    ({"test_noise": {"poisson": [0]}}, "task.test_noise.poisson: task.noise.levels: poisson dose"),
    ({"test_noise": {"gaussian": []}}, "task.test_noise.gaussian: give at least one level"),
    ({"patches_per_image": 0}, "task.patches_per_image must be positive"),
    ({"model": {"net": {"depth": 3}}}, "model.net: the model config must give the network's _target_"),
    ({"model": {"net": {"_target_": "medsec.models.NoSuchNet"}}},
     "model.net: _target_ = 'medsec.models.NoSuchNet' is not a registered network target"),
])
def test_bad_configuration_names_the_field(datamodule: MedicalDataModule, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_task(datamodule, **kwargs)
