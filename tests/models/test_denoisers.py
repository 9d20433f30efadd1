"""Denoising networks: shapes, residual learning, output range, the model configs."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from medsec.models import DenoisingAutoencoder, DnCNN
from medsec.tasks.denoising import DenoisingTask
from medsec.utils.config import CONFIG_DIR

OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


@pytest.mark.parametrize("shape", [(2, 1, 35, 51), (1, 3, 32, 32), (1, 1, 12, 10, 9)])
def test_autoencoder_keeps_any_shape_in_unit_range(shape: tuple[int, ...]) -> None:
    net = DenoisingAutoencoder(in_channels=shape[1], channels=(8, 16), spatial_dims=len(shape) - 2).eval()
    out = net(torch.rand(shape))
    assert out.shape == shape
    assert out.min() >= 0 and out.max() <= 1


def test_dncnn_is_residual() -> None:
    net = DnCNN(in_channels=1, depth=4, features=8).eval()
    x = torch.rand(2, 1, 17, 23)
    assert net(x).shape == x.shape
    last = net.body[-1].conv
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    assert torch.equal(net(x), x)  # no predicted noise: the input passes unchanged
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 4


def test_dncnn_refuses_too_shallow() -> None:
    with pytest.raises(ValueError, match="depth >= 3"):
        DnCNN(depth=2)


@pytest.mark.parametrize("name", ["dae", "dncnn", "monai_autoencoder"])
def test_model_configs_build_through_the_task(name: str) -> None:
    model = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"))
    task = DenoisingTask(model=model, optimizer=OPTIMIZER, in_channels=1, spatial_dims=2)
    x = torch.rand(2, 1, 32, 32)
    assert task.eval()(x).shape == x.shape
