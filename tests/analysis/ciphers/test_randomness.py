"""NIST SP 800-22 tests against the worked examples of its section 2."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.analysis.ciphers import randomness as R

# section 2.1.8 (and later sections): the first 100 bits of the binary expansion of e
E_100 = ("11001001000011111101101010100010001000010110100011000010001101001100010011000110011000101000101110"
         "00")
LONGEST_128 = ("11001100000101010110110001001100111000000000001001001101010100010001001111010110100000001101011111"
               "001100111001101101100010110010")


@pytest.mark.parametrize(("test", "bits", "kwargs", "expected"), [
    (R.frequency, "1011010101", {}, 0.527089),
    (R.frequency, E_100, {}, 0.109599),
    (R.block_frequency, "0110011010", {"block": 3}, 0.801252),
    (R.block_frequency, E_100, {"block": 10}, 0.706438),
    (R.runs, "1001101011", {}, 0.147232),
    (R.runs, E_100, {}, 0.500798),
    (R.longest_run, LONGEST_128, {}, 0.180598),  # igamc(3/2, 4.882605/2) for the printed chi2; the printed P-value 0.180609 is off in its 5th digit
    (R.approximate_entropy, "0100110101", {"m": 3}, 0.261961),
    (R.approximate_entropy, E_100, {"m": 2}, 0.235301),
])
def test_worked_examples(test, bits: str, kwargs: dict, expected: float) -> None:
    assert test(bits, **kwargs) == pytest.approx(expected, abs=1e-6)


def test_cumulative_sums_examples() -> None:
    assert R.cumulative_sums("1011010111")[0] == pytest.approx(0.4116588, abs=1e-4)  # printed to 4 places of accuracy
    forward, backward = R.cumulative_sums(E_100)
    assert (forward, backward) == (pytest.approx(0.219194, abs=1e-6), pytest.approx(0.114866, abs=1e-6))


def test_random_bits_pass_and_constant_bits_fail() -> None:
    random_bits = R.to_bits(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8))
    assert random_bits.size == 65536 and set(np.unique(random_bits)) == {0, 1}
    assert min(R.run_tests(random_bits).values()) >= R.ALPHA
    constant = np.tile([1, 1, 1, 0], 2048)
    results = R.run_tests(constant)
    assert set(results) == {"frequency", "block_frequency", "runs", "longest_run", "cumulative_sums_forward",
                            "cumulative_sums_backward", "approximate_entropy"}
    assert results["frequency"] < R.ALPHA and results["approximate_entropy"] < R.ALPHA


def test_bits_are_most_significant_first() -> None:
    assert R.to_bits(b"\x80\x01").tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]


def test_longest_run_needs_128_bits() -> None:
    with pytest.raises(ValueError, match="128 bits"):
        R.longest_run("1" * 100)
