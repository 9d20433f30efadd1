"""BD-rate on hand-made rate-distortion curves with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medsec.analysis.bdrate import bd_quality, bd_rate, rising

RATES = [0.1, 0.2, 0.35, 0.5, 0.7]
PSNR = [30.0, 33.0, 35.5, 37.0, 38.5]


@pytest.mark.parametrize("method", ["pchip", "akima", "cubic"])
def test_identical_curves_give_zero(method: str) -> None:
    assert bd_rate(RATES, PSNR, RATES, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("factor, expected", [(0.5, -50.0), (2.0, 100.0), (0.8, -20.0)])
@pytest.mark.parametrize("method", ["pchip", "akima", "cubic"])
def test_a_constant_rate_factor_is_recovered(factor: float, expected: float, method: str) -> None:
    """A codec spending ``factor`` times the bits at every quality: BD-rate ``100 (factor - 1)``."""
    test_rates = [factor * rate for rate in RATES]
    assert bd_rate(RATES, PSNR, test_rates, PSNR, method=method) == pytest.approx(expected, abs=1e-6)


def test_half_the_bits_on_a_denser_curve_with_other_points() -> None:
    """The test curve samples the same log-linear law at other qualities: still -50 %."""
    anchor_rates = np.geomspace(0.05, 1.0, 12)
    anchor_quality = 30 + 6 * np.log2(anchor_rates / 0.05)
    test_quality = np.array([31.0, 34.0, 37.0, 40.0, 45.0])
    test_rates = 0.5 * 0.05 * 2 ** ((test_quality - 30) / 6)
    assert bd_rate(anchor_rates, anchor_quality, test_rates, test_quality) == pytest.approx(-50.0, abs=1e-6)


def test_rate_range_restricts_the_anchor() -> None:
    """Outside 0.1-0.6 bpp the test codec is much worse; inside it uses half the bits."""
    anchor_rates = np.geomspace(0.02, 2.0, 21)
    anchor_quality = 25 + 5 * np.log2(anchor_rates / 0.02)
    test_rates = 0.5 * anchor_rates
    test_rates[anchor_rates > 0.7] *= 10  # ruinous only at high rates
    test_quality = anchor_quality
    inside = bd_rate(anchor_rates, anchor_quality, test_rates, test_quality, rate_range=(0.1, 0.6))
    assert inside == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(anchor_rates, anchor_quality, test_rates, test_quality) > -20


def test_dominated_points_are_dropped_and_no_overlap_is_nan() -> None:
    rates, qualities = rising([0.4, 0.1, 0.2, 0.3], [35.0, 30.0, 33.0, 32.0])
    assert rates.tolist() == [0.1, 0.2, 0.4] and qualities.tolist() == [30.0, 33.0, 35.0]
    assert math.isnan(bd_rate(RATES, PSNR, [1.0, 2.0], [50.0, 60.0]))  # no common quality
    assert math.isnan(bd_rate(RATES, PSNR, [0.3], [34.0]))  # one point is no curve
    with pytest.raises(ValueError, match="method must be one of"):
        bd_rate(RATES, PSNR, RATES, PSNR, method="linear")


@pytest.mark.parametrize("method", ["pchip", "akima", "cubic"])
def test_bd_quality_recovers_a_constant_shift(method: str) -> None:
    assert bd_quality(RATES, PSNR, RATES, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)
    better = [quality + 1.5 for quality in PSNR]
    assert bd_quality(RATES, PSNR, RATES, better, method=method) == pytest.approx(1.5, abs=1e-9)


def test_bd_quality_is_defined_where_bd_rate_is_not() -> None:
    """A codec far below the anchor's qualities at the same rates: no common quality, common rates."""
    worse = [quality - 10 for quality in PSNR]
    assert math.isnan(bd_rate(RATES, PSNR, RATES, worse))
    assert bd_quality(RATES, PSNR, RATES, worse) == pytest.approx(-10.0, abs=1e-9)
    assert math.isnan(bd_quality(RATES, PSNR, [2.0, 3.0], [40.0, 41.0]))  # no common rate
