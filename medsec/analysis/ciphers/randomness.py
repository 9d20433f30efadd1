"""A subset of the NIST SP 800-22 rev. 1a statistical tests for random bit sequences.

Each test takes a 0/1 array and returns its P-value (two for cumulative sums: forward and
backward); a sequence passes at ``p >= 0.01``. Section numbers refer to SP 800-22 rev. 1a.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import erfc, gammaincc
from scipy.stats import norm

ALPHA = 0.01

LONGEST_RUN_TABLE = (  # (min n, M, lowest category v, probabilities): section 2.4.4
    (750_000, 10_000, 10, (0.0882, 0.2092, 0.2483, 0.1933, 0.1208, 0.0675, 0.0727)),
    (6_272, 128, 4, (0.1174, 0.2430, 0.2493, 0.1752, 0.1027, 0.1124)),
    (128, 8, 1, (0.2148, 0.3672, 0.2305, 0.1875)),
)


def to_bits(data: bytes | np.ndarray) -> np.ndarray:
    """The bits of ``data`` (bytes or a uint8 array), most significant first, as a 0/1 array."""
    return np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes)
                         else np.asarray(data, dtype=np.uint8).ravel())


def _bits(bits: np.ndarray | str) -> np.ndarray:
    if isinstance(bits, str):
        bits = np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
    return np.asarray(bits, dtype=np.int64)


def frequency(bits: np.ndarray | str) -> float:
    """Frequency (monobit) test, section 2.1."""
    b = _bits(bits)
    s_obs = abs(int((2 * b - 1).sum())) / np.sqrt(b.size)
    return float(erfc(s_obs / np.sqrt(2)))


def block_frequency(bits: np.ndarray | str, block: int | None = None) -> float:
    """Frequency test within blocks of ``block`` bits, section 2.2 (default: the smallest block
    of at least 20 bits that gives fewer than 100 blocks)."""
    b = _bits(bits)
    block = block or max(20, b.size // 99 + 1)
    count = b.size // block
    pi = b[: count * block].reshape(count, block).mean(1)
    chi2 = 4 * block * ((pi - 0.5) ** 2).sum()
    return float(gammaincc(count / 2, chi2 / 2))


def runs(bits: np.ndarray | str) -> float:
    """Runs test, section 2.3 (0 when the frequency pre-test fails)."""
    b = _bits(bits)
    n = b.size
    pi = b.mean()
    if abs(pi - 0.5) >= 2 / np.sqrt(n):
        return 0.0
    v_obs = 1 + int((b[1:] != b[:-1]).sum())
    return float(erfc(abs(v_obs - 2 * n * pi * (1 - pi)) / (2 * np.sqrt(2 * n) * pi * (1 - pi))))


def _longest_runs(blocks: np.ndarray) -> np.ndarray:
    """Longest run of ones in each row."""
    counts = np.cumsum(blocks, axis=1)
    reset = np.maximum.accumulate(np.where(blocks == 0, counts, 0), axis=1)
    return (counts - reset).max(axis=1)


def longest_run(bits: np.ndarray | str) -> float:
    """Test for the longest run of ones in a block, section 2.4 (needs at least 128 bits)."""
    b = _bits(bits)
    for min_n, block, lowest, probabilities in LONGEST_RUN_TABLE:
        if b.size >= min_n:
            break
    else:
        raise ValueError(f"the longest-run test needs at least 128 bits, got {b.size}")
    count = b.size // block
    longest = _longest_runs(b[: count * block].reshape(count, block))
    k = len(probabilities) - 1
    categories = np.clip(longest - lowest, 0, k)
    observed = np.bincount(categories, minlength=k + 1)
    expected = count * np.asarray(probabilities)
    chi2 = (((observed - expected) ** 2) / expected).sum()
    return float(gammaincc(k / 2, chi2 / 2))


def _cusum_p(z: int, n: int) -> float:
    root = np.sqrt(n)
    k1 = np.arange(int(np.floor((-n / z + 1) / 4)), int(np.floor((n / z - 1) / 4)) + 1)
    k2 = np.arange(int(np.floor((-n / z - 3) / 4)), int(np.floor((n / z - 1) / 4)) + 1)
    first = (norm.cdf((4 * k1 + 1) * z / root) - norm.cdf((4 * k1 - 1) * z / root)).sum()
    second = (norm.cdf((4 * k2 + 3) * z / root) - norm.cdf((4 * k2 + 1) * z / root)).sum()
    return float(1 - first + second)


def cumulative_sums(bits: np.ndarray | str) -> tuple[float, float]:
    """Cumulative sums test, section 2.13: (forward, backward) P-values."""
    x = 2 * _bits(bits) - 1
    forward = int(np.abs(np.cumsum(x)).max())
    backward = int(np.abs(np.cumsum(x[::-1])).max())
    return _cusum_p(forward, x.size), _cusum_p(backward, x.size)


def _phi(b: np.ndarray, m: int) -> float:
    """Phi^(m) of section 2.12.4: overlapping m-bit patterns of the circular sequence."""
    if m == 0:
        return 0.0
    n = b.size
    wrapped = np.concatenate([b, b[: m - 1]])
    values = np.zeros(n, dtype=np.int64)
    for offset in range(m):
        values = (values << 1) | wrapped[offset:offset + n]
    counts = np.bincount(values, minlength=2**m)
    c = counts[counts > 0] / n
    return float((c * np.log(c)).sum())


def approximate_entropy(bits: np.ndarray | str, m: int | None = None) -> float:
    """Approximate entropy test with ``m``-bit templates, section 2.12 (default: the largest ``m``
    below ``log2(n) - 5``, at most 10)."""
    b = _bits(bits)
    m = m or max(1, min(10, int(np.floor(np.log2(b.size))) - 6))
    ap_en = _phi(b, m) - _phi(b, m + 1)
    chi2 = 2 * b.size * (np.log(2) - ap_en)
    return float(gammaincc(2 ** (m - 1), chi2 / 2))


TESTS: dict[str, Callable[[np.ndarray], float | tuple[float, ...]]] = {
    "frequency": frequency,
    "block_frequency": block_frequency,
    "runs": runs,
    "longest_run": longest_run,
    "cumulative_sums": cumulative_sums,
    "approximate_entropy": approximate_entropy,
}


def run_tests(bits: np.ndarray) -> dict[str, float]:
    """Every test of :data:`TESTS` on one sequence; cumulative sums gives ``..._forward`` and
    ``..._backward``."""
    results: dict[str, float] = {}
    for name, test in TESTS.items():
        value = test(bits)
        if isinstance(value, tuple):
            results |= {f"{name}_forward": value[0], f"{name}_backward": value[1]}
        else:
            results[name] = value
    return results
