"""Bjontegaard deltas: BD-rate, how many more (positive) or fewer (negative) bits, in per cent, a codec
spends than an anchor codec for the same quality, averaged over the qualities both reach; and
BD-quality (BD-PSNR for PSNR), the quality difference at the same rate, averaged over the rates
both cover (defined where BD-rate is not: curves whose qualities do not overlap).

The computation is the ``bjontegaard`` package's (FAU Erlangen; log10 rate interpolated as a
function of quality, integrated over the overlapping quality interval, ``10 ** mean - 1``); this
module chooses the points: the anchor's are restricted to a rate range (the one a comparison is
about, e.g. 0.1-0.6 bpp), and points that do not raise the quality above a cheaper point of the
same curve are dropped (they are dominated, and the interpolation needs a rising curve).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

METHODS = ("pchip", "akima", "cubic")
"""Interpolations of log-rate against quality: ``pchip`` (monotone piecewise cubic, the default),
``akima``, ``cubic`` (one cubic polynomial, Bjontegaard's VCEG-M33 original; needs four points)."""


def rising(rates: Sequence[float], qualities: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points sorted by rate, keeping only those whose quality beats every cheaper point."""
    order = np.argsort(np.asarray(rates, dtype=float), kind="stable")
    kept_rates, kept_qualities = [], []
    for index in order:
        if not kept_qualities or qualities[index] > kept_qualities[-1]:
            kept_rates.append(float(rates[index]))
            kept_qualities.append(float(qualities[index]))
    return np.array(kept_rates), np.array(kept_qualities)


Curve = tuple[np.ndarray, np.ndarray]


def _curves(anchor_rates: Sequence[float], anchor_qualities: Sequence[float], test_rates: Sequence[float],
            test_qualities: Sequence[float], rate_range: tuple[float, float] | None,
            method: str) -> tuple[Curve | None, Curve | None]:
    """The two curves' :func:`rising` points, the anchor's within ``rate_range``; ``None`` for a
    curve with too few points for ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got '{method}'")
    if len(anchor_rates) != len(anchor_qualities) or len(test_rates) != len(test_qualities):
        raise ValueError("each curve needs as many rates as qualities")
    if rate_range is not None:
        low, high = rate_range
        inside = [i for i, rate in enumerate(anchor_rates) if low <= rate <= high]
        anchor_rates = [anchor_rates[i] for i in inside]
        anchor_qualities = [anchor_qualities[i] for i in inside]
    fewest = 4 if method == "cubic" else 2
    curves = (rising(anchor_rates, anchor_qualities), rising(test_rates, test_qualities))
    return tuple(curve if len(curve[0]) >= fewest else None for curve in curves)  # type: ignore[return-value]


def bd_rate(anchor_rates: Sequence[float], anchor_qualities: Sequence[float], test_rates: Sequence[float],
            test_qualities: Sequence[float], rate_range: tuple[float, float] | None = None,
            method: str = "pchip") -> float:
    """BD-rate (per cent) of the test curve against the anchor curve (rates, e.g. bpp, and qualities,
    e.g. PSNR or MS-SSIM, higher is better). ``rate_range``: use only the anchor points within it,
    so the average runs over the qualities the anchor reaches there. NaN when the quality
    intervals do not overlap or a curve keeps fewer than two points (four for ``cubic``)."""
    from bjontegaard import bd_rate as package_bd_rate

    anchor, test = _curves(anchor_rates, anchor_qualities, test_rates, test_qualities, rate_range, method)
    if anchor is None or test is None:
        return float("nan")
    if min(anchor[1][-1], test[1][-1]) <= max(anchor[1][0], test[1][0]):
        return float("nan")  # no common quality
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small overlap is reported by the caller, not as a warning
        return float(package_bd_rate(anchor[0], anchor[1], test[0], test[1], method=method,
                                     require_matching_points=False, min_overlap=0))


def bd_quality(anchor_rates: Sequence[float], anchor_qualities: Sequence[float], test_rates: Sequence[float],
               test_qualities: Sequence[float], rate_range: tuple[float, float] | None = None,
               method: str = "pchip") -> float:
    """BD-quality (e.g. BD-PSNR in dB; positive: the test codec is better at the same rate), with the
    points chosen as for :func:`bd_rate`; NaN when the rates do not overlap."""
    from bjontegaard import bd_psnr

    anchor, test = _curves(anchor_rates, anchor_qualities, test_rates, test_qualities, rate_range, method)
    if anchor is None or test is None or min(anchor[0][-1], test[0][-1]) <= max(anchor[0][0], test[0][0]):
        return float("nan")  # no common rate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(bd_psnr(anchor[0], anchor[1], test[0], test[1], method=method,
                             require_matching_points=False, min_overlap=0))
