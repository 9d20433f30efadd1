"""Image-encryption metrics against closed-form cases and the published critical values."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.analysis.ciphers import statistics as M


@pytest.fixture
def uniform() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 256, 256), dtype=np.uint8)


def test_identical_images_change_nothing(uniform: np.ndarray) -> None:
    assert np.all(M.npcr(uniform, uniform) == 0) and np.all(M.uaci(uniform, uniform) == 0)
    assert np.all(np.isinf(M.psnr(uniform, uniform))) and np.allclose(M.ssim(uniform[:2], uniform[:2]), 1.0)


def test_independent_uniform_ciphers_reach_the_ideal_values(uniform: np.ndarray) -> None:
    other = np.random.default_rng(1).integers(0, 256, uniform.shape, dtype=np.uint8)
    assert M.npcr(uniform, other).mean() == pytest.approx(M.NPCR_IDEAL, abs=0.05)
    assert M.uaci(uniform, other).mean() == pytest.approx(M.UACI_IDEAL, abs=0.1)
    assert M.entropy(uniform).mean() == pytest.approx(8.0, abs=0.005)
    assert M.NPCR_IDEAL == pytest.approx(99.6094, abs=1e-4) and M.UACI_IDEAL == pytest.approx(33.4635, abs=1e-4)


def test_one_changed_pixel_and_extremes() -> None:
    black, white = np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)
    one = black.copy()
    one[1, 2] = 255
    assert M.npcr(black, one)[0] == pytest.approx(100 / 16)
    assert M.uaci(black, white)[0] == pytest.approx(100.0)


@pytest.mark.parametrize(("size", "npcr", "low", "high"), [
    (28, 99.2429, 31.8072, 35.1199), (128, 99.5292, 33.1012, 33.8259),
    (256, 99.5693, 33.2824, 33.6447), (512, 99.5893, 33.3730, 33.5541)])
def test_critical_values_reproduce_wu_noonan_agaian(size: int, npcr: float, low: float, high: float) -> None:
    crit = M.critical_values(size, size, alpha=0.05)
    assert (round(crit.npcr, 4), round(crit.uaci_low, 4), round(crit.uaci_high, 4)) == (npcr, low, high)
    assert crit.npcr_passes(np.array([npcr + 0.01, npcr - 0.01])).tolist() == [True, False]
    assert crit.uaci_passes(np.array([33.46, low - 0.01, high + 0.01])).tolist() == [True, False, False]


def test_entropy_of_known_histograms() -> None:
    two_levels = np.zeros((16, 16), np.uint8)
    two_levels[:8] = 200
    assert M.entropy(np.zeros((8, 8), np.uint8))[0] == 0
    assert M.entropy(two_levels)[0] == pytest.approx(1.0)
    assert M.entropy(np.arange(256, dtype=np.uint8).reshape(16, 16))[0] == pytest.approx(8.0)


def test_histogram_thresholds(uniform: np.ndarray) -> None:
    assert M.chi_square_critical(0.05) == pytest.approx(293.2478, abs=1e-4)
    assert M.entropy_threshold(256 * 256, 0.05) == pytest.approx(7.99677, abs=1e-5)
    assert M.chi_square(np.arange(256, dtype=np.uint8).reshape(16, 16))[0] == 0
    assert (M.chi_square(uniform) < M.chi_square_critical()).mean() >= 0.75


@pytest.mark.parametrize("side", [32, 64])
def test_entropy_threshold_rejects_alpha_of_uniform_small_images(side: int) -> None:
    """The chi-square approximation rejects ~18 % of uniform 32x32 images at 5 %; ours rejects ~5 %."""
    images = np.random.default_rng(1).integers(0, 256, (4000, side, side), dtype=np.uint8)
    rejected = (M.entropy(images) < M.entropy_threshold(side * side, 0.05)).mean()
    assert 0.04 <= rejected <= 0.06


def test_correlation_of_smooth_and_random_images(uniform: np.ndarray) -> None:
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    for direction in M.DIRECTIONS:
        assert M.correlation(ramp, direction)[0] > 0.99
        limit = M.correlation_threshold(256, 256, direction)
        assert np.abs(M.correlation(uniform, direction)).max() < 3 * limit
    assert np.isnan(M.correlation(np.zeros((8, 8), np.uint8), "horizontal")[0])
    with pytest.raises(ValueError, match="direction"):
        M.correlation(ramp, "sideways")


def test_proportion_test_allows_the_failures_an_ideal_cipher_has() -> None:
    passes = np.ones(100, bool)
    passes[:5] = False  # exactly alpha = 5 % fail: what an ideal cipher gives
    assert M.proportion_test(passes, 0.05).passed
    passes[:30] = False
    result = M.proportion_test(passes, 0.05)
    assert not result.passed and result.passed_count == 70 and result.min_passing > 70


def test_rejects_non_8_bit_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        M.entropy(np.zeros((4, 4), np.float32))
