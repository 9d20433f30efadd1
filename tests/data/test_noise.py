"""Noise models: their statistics, level ranges, seeding and errors."""
from __future__ import annotations

import math
import re

import pytest
import torch

from medsec.data.noise import (
    NOISE_MODELS,
    GaussianNoise,
    PoissonNoise,
    RicianNoise,
    SpeckleNoise,
    build_noise,
    level_slug,
)
from medsec.errors import ConfigError, DataError


def flat(value: float, size: int = 256) -> torch.Tensor:
    return torch.full((1, size, size), value)


def test_gaussian_residual_has_sigma() -> None:
    clean = flat(0.5)
    residual = GaussianNoise(0.05)(clean) - clean
    assert residual.std().item() == pytest.approx(0.05, rel=0.03)
    assert abs(residual.mean().item()) < 0.002


def test_poisson_variance_is_mean_over_dose() -> None:
    for dose in (50.0, 400.0):
        noisy = PoissonNoise(dose, clip=False)(flat(0.4))
        assert noisy.mean().item() == pytest.approx(0.4, rel=0.02)
        assert noisy.var().item() == pytest.approx(0.4 / dose, rel=0.05)
    counts = PoissonNoise(50.0)(flat(0.3)) * 50  # photon counts are integers
    assert torch.allclose(counts, counts.round(), atol=1e-4)


def test_rician_bias_on_zero_background() -> None:
    sigma = 0.05
    noisy = RicianNoise(sigma)(flat(0.0))
    assert (noisy >= 0).all()
    assert noisy.mean().item() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)
    bright = RicianNoise(sigma)(flat(0.6))  # high SNR: nearly Gaussian around sqrt(x^2 + sigma^2)
    assert bright.mean().item() == pytest.approx(math.hypot(0.6, sigma), abs=0.002)
    assert bright.std().item() == pytest.approx(sigma, rel=0.05)


def test_speckle_is_multiplicative() -> None:
    clean = torch.cat([flat(0.0), flat(0.2), flat(0.6)])
    noisy = SpeckleNoise(0.2, clip=False)(clean)
    assert torch.equal(noisy[0], clean[0])  # nothing to multiply
    ratio = (noisy[2] - 0.6).std() / (noisy[1] - 0.2).std()
    assert ratio.item() == pytest.approx(3.0, rel=0.05)
    assert ((noisy[1] / 0.2) - 1).std().item() == pytest.approx(0.2, rel=0.05)


def test_clip_keeps_unit_range_and_dtype_device() -> None:
    clean = torch.rand(1, 32, 32, dtype=torch.float64)
    for model in NOISE_MODELS.values():
        noisy = model(10.0 if model is PoissonNoise else 0.3)(clean)
        assert noisy.dtype == clean.dtype and noisy.shape == clean.shape
        assert noisy.min() >= 0 and noisy.max() <= 1


def test_level_is_drawn_per_call_from_the_range() -> None:
    noise = GaussianNoise([0.02, 0.1])
    levels = []
    for _ in range(200):
        noise(flat(0.5, 8))
        levels.append(noise.level)
    assert 0.02 <= min(levels) < 0.03 and 0.09 < max(levels) <= 0.1
    assert len(set(levels)) == 200


def test_seeding_reproduces_and_differs() -> None:
    clean = flat(0.5, 32)
    a, b, c = (RicianNoise([0.01, 0.1], seed=s) for s in (7, 7, 8))
    first = a(clean)
    assert torch.equal(first, b(clean))
    assert not torch.equal(first, c(clean))
    a.set_random_state(7)
    assert torch.equal(a(clean), first)


def test_build_noise_from_config() -> None:
    noise = build_noise({"name": "poisson", "levels": [50, 100], "clip": False})
    assert isinstance(noise, PoissonNoise) and noise.levels == (50.0, 100.0) and not noise.clip
    assert build_noise({"name": "speckle", "levels": 0.1}).levels == (0.1, 0.1)
    assert level_slug(0.05) == "0.05" and level_slug(100.0) == "100"


@pytest.mark.parametrize(("config", "message"), [
    ({"name": "salt", "levels": 0.1}, "task.noise.name: unknown noise model 'salt'"),
    ({"name": "gaussian", "levels": -0.1}, "task.noise.levels: gaussian sigma must be in [0, 1]"),
    ({"name": "poisson", "levels": [0, 100]}, "task.noise.levels: poisson dose"),
    ({"name": "rician", "levels": [0.2, 0.1]}, "low <= high"),
    ({"name": "speckle", "levels": [0.1, 0.2, 0.3]}, "a number or [low, high]"),
    ({"name": "gaussian", "levels": "high"}, "a number or [low, high]"),
    ({"name": "gaussian"}, "task.noise needs 'name' and 'levels'"),
    ({"name": "gaussian", "levels": 0.1, "sigma": 2}, "task.noise needs"),
])
def test_bad_config_names_the_field(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_noise(config)


def test_images_outside_unit_range_are_refused() -> None:
    with pytest.raises(DataError, match=r"gaussian noise expects images in \[0, 1\]; got values in \[0, 255\]"):
        GaussianNoise(0.1)(torch.tensor([0.0, 255.0]))

