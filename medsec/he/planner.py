"""CKKS parameters from what the model needs: multiplicative depth, value range and precision.

Each layer (an affine map with plaintext weights, or a square) ends with one rescale, which drops
one prime of ``scale_bits`` from the modulus chain. The chain is therefore
``[first, scale_bits x depth, special]`` where ``first`` holds the result's integer part plus its
fractional precision and the special prime (key switching: relinearisation and rotations) is at
least as large as ``first`` and takes the spare bits of the budget, up to 60, which divides the
key-switching noise. The smallest
polynomial degree whose 128-bit-security modulus budget holds the chain (and whose slot count
holds the batch) wins.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from medsec.errors import ConfigError

MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient-modulus bits for 128-bit classical security (HE standard, SEAL)."""
MAX_PRIME_BITS = 60
"""SEAL's largest prime of a coefficient modulus."""


@dataclass(frozen=True)
class CKKSParams:
    """A CKKS parameter set: ``coeff_mod_bit_sizes`` is the whole chain, special prime last."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    depth: int
    integer_bits: int
    precision_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def to_dict(self) -> dict:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "slots": self.slots,
                "modulus_bits": self.modulus_bits}

    @classmethod
    def from_dict(cls, data: dict) -> CKKSParams:
        fields = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "depth", "integer_bits", "precision_bits")
        try:
            return cls(**{k: tuple(data[k]) if k == "coeff_mod_bit_sizes" else int(data[k]) for k in fields})
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"params: not a CKKS parameter set ({err})") from err


def noise_bits(poly_modulus_degree: int) -> int:
    """Bits of the scale eaten by CKKS noise: a fresh encryption decrypts with an error of about
    ``N / scale`` (measured: 2^-10 at N=8192, scale 2^23), plus 2 bits for the products and
    key switches that follow."""
    return math.ceil(math.log2(poly_modulus_degree)) + 2


def plan_parameters(depth: int, max_abs: float, precision_bits: int = 12, min_slots: int = 1) -> CKKSParams:
    """The smallest CKKS parameters that evaluate ``depth`` rescaling layers on values up to
    ``max_abs`` in magnitude (at any layer) with ``precision_bits`` fractional bits, on vectors
    of ``min_slots`` values.

    Raises:
        ConfigError: no polynomial degree up to 32768 fits (the model is too deep or needs too
            much precision), naming what would be needed.
    """
    if depth < 1:
        raise ConfigError(f"depth must be at least 1, got {depth}")
    if not 1 <= precision_bits <= 40:
        raise ConfigError(f"precision_bits must be within 1..40, got {precision_bits}")
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ConfigError(f"max_abs must be a finite non-negative number, got {max_abs}")
    integer_bits = max(1, math.ceil(math.log2(max_abs + 1))) + 1  # + sign
    tried = []
    for degree, budget in MAX_MODULUS_BITS.items():
        scale_bits = precision_bits + noise_bits(degree)
        first = scale_bits + integer_bits
        needed = 2 * first + depth * scale_bits
        tried.append(f"N={degree}: {needed} of {budget} bits")
        if degree // 2 >= min_slots and needed <= budget and first <= MAX_PRIME_BITS:
            special = min(MAX_PRIME_BITS, budget - needed + first)  # spare bits cut key-switching noise
            chain = (first, *([scale_bits] * depth), special)
            return CKKSParams(degree, chain, scale_bits, depth, integer_bits, precision_bits)
    raise ConfigError(
        f"model: multiplicative depth {depth} with values up to {max_abs:.3g} ({integer_bits} integer bits) and "
        f"{precision_bits} precision bits needs more coefficient modulus than CKKS allows at 128-bit security "
        f"({'; '.join(tried)}; slots needed {min_slots}); use fewer layers (model.net.hidden) or a lower "
        "precision_bits")
