"""The number systems two secret-sharing servers compute in. Arrays are ``[words, n, width]``:

- :class:`Ring64`: Z_2^64 (one word, machine arithmetic that wraps), fixed point with ``f``
  fractional bits and SecureML's local truncation after every multiplication: cheap, approximate,
  and a truncation can fail with a small probability the planner bounds.
- :class:`RNS`: a residue number system, Z_M with M the product of ``k`` primes below 2^21, one
  word per prime; no truncation at all: the scale grows through the layers and M is chosen large
  enough to hold the last one, so the servers compute the quantised model *exactly* (Chinese
  remaindering at the client), at ``k`` times the traffic.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from medsec.errors import ConfigError, DataError

RING_BITS = 64
MAX_FRAC_BITS = 20
FAILURE_BITS = 30
"""Ring64: a local truncation fails (a wrong value) with probability at most 2^-FAILURE_BITS per value."""
RNS_PRIME_BITS = 21
"""RNS primes stay below 2^21, so a product is below 2^42 and a matrix product of up to 2^21 terms
stays below 2^63 in int64."""


class Layered(Protocol):
    """What the number systems need of a program: its layers, input shape and largest value."""

    layers: list[Any]
    input_shape: tuple[int, ...]
    max_abs: float


class Arithmetic(Protocol):
    """Encoding, ring operations and decoding of one number system."""

    name: str
    words: int

    def params(self) -> dict[str, Any]: ...

    def encode_input(self, x: np.ndarray) -> np.ndarray: ...

    def weights(self, program: Layered) -> list[tuple[np.ndarray, np.ndarray] | None]: ...

    def random(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray: ...

    def reduce(self, v: np.ndarray) -> np.ndarray: ...

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...

    def after(self, v: np.ndarray, party: int) -> np.ndarray: ...

    def decode(self, v: np.ndarray) -> np.ndarray: ...

    def check(self, v: np.ndarray, field: str) -> np.ndarray: ...


def _scaled(x: np.ndarray, bits: int) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64) * 2.0 ** bits).astype(np.int64)


# ---- Z_2^64 ----------------------------------------------------------------------------------
class Ring64:
    """Z_2^64 fixed point with ``frac_bits`` fractional bits."""

    name = "ring64"
    words = 1

    def __init__(self, frac_bits: int) -> None:
        self.frac_bits = int(frac_bits)

    @classmethod
    def plan(cls, program: Layered) -> Ring64:
        """The most fractional bits (at most ``MAX_FRAC_BITS``) for which a value of ``program``
        (bounded by its calibrated ``max_abs``) truncates wrongly with probability at most
        2^-FAILURE_BITS: a value at scale 2^(2f) keeps ``FAILURE_BITS + 1`` bits of headroom."""
        magnitude = math.ceil(math.log2(max(program.max_abs, 1.0)))
        frac = (RING_BITS - 2 - FAILURE_BITS - magnitude) // 2
        if frac < 6:
            raise ConfigError(f"secret sharing: the model's values reach {program.max_abs:.3g}, which leaves {frac} "
                              "fractional bits in a 64-bit ring (at least 6 needed); use arithmetic=rns")
        return cls(min(frac, MAX_FRAC_BITS))

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "frac_bits": self.frac_bits}

    def encode_input(self, x: np.ndarray) -> np.ndarray:
        return _scaled(x, self.frac_bits).view(np.uint64)[None]

    def weights(self, program: Layered) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Matrices at scale 2^f and biases at 2^2f (the scale of a product, before truncation)."""
        return [(_scaled(layer.matrix, self.frac_bits).view(np.uint64)[None],
                 _scaled(layer.bias, 2 * self.frac_bits).view(np.uint64)[None, None])
                if layer.kind == "affine" else None for layer in program.layers]

    def random(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, 2 ** 64, size=shape, dtype=np.uint64, endpoint=False)

    def reduce(self, v: np.ndarray) -> np.ndarray:
        return v  # uint64 arithmetic wraps modulo 2^64 by itself

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    def after(self, v: np.ndarray, party: int) -> np.ndarray:
        """A party's share of ``x / 2^f`` from its share of ``x`` (SecureML, local)."""
        signed = v.view(np.int64)
        out = signed >> self.frac_bits if party == 0 else -((-signed) >> self.frac_bits)
        return out.view(np.uint64)

    def decode(self, v: np.ndarray) -> np.ndarray:
        return v[0].view(np.int64).astype(np.float64) / 2.0 ** self.frac_bits

    def check(self, v: np.ndarray, field: str) -> np.ndarray:
        return v  # every 64-bit word is an element of the ring

    def error_bound(self, program: Layered, x: np.ndarray) -> np.ndarray:
        """Per image and output, a bound on |shared - plaintext| for the images ``x`` ([n, C*H*W]):
        rounding of the input and weights (half a unit, 2^-f, each) and one unit per truncation,
        carried through the layers with the plaintext values (interval arithmetic)."""
        ulp = 2.0 ** -self.frac_bits
        err = np.full(x.shape, ulp / 2)
        for layer in program.layers:
            if layer.kind == "affine":
                err = err @ np.abs(layer.matrix) + (np.abs(x) + err).sum(axis=1, keepdims=True) * ulp / 2 + 2 * ulp
            else:
                err = 2 * np.abs(x) * err + err * err + ulp
            x = layer.apply(x)
        return err


# ---- residue number system -------------------------------------------------------------------
def primes_below(bound: int, count: int) -> list[int]:
    """The ``count`` largest primes below ``bound``."""
    found, candidate = [], bound - 1
    while len(found) < count:
        if candidate % 2 and all(candidate % d for d in range(3, math.isqrt(candidate) + 1, 2)):
            found.append(candidate)
        candidate -= 1
    return found


def scales(program: Layered, frac_bits: int) -> list[int]:
    """The integer scale of every layer's output when nothing is truncated: an affine layer
    multiplies its input's scale by 2^f (the weights'), a square squares it."""
    scale, out = 2 ** frac_bits, []
    for layer in program.layers:
        scale = scale * 2 ** frac_bits if layer.kind == "affine" else scale * scale
        out.append(scale)
    return out


class RNS:
    """Z_M, M = the product of ``moduli`` (primes below 2^21), without truncation."""

    name = "rns"

    def __init__(self, frac_bits: int, moduli: list[int], final_scale: int) -> None:
        self.frac_bits, self.moduli, self.final_scale = int(frac_bits), [int(m) for m in moduli], int(final_scale)
        self.words = len(self.moduli)
        self._m = np.array(self.moduli, dtype=np.int64)[:, None, None]
        self.modulus = math.prod(self.moduli)

    @classmethod
    def plan(cls, program: Layered, frac_bits: int = 16) -> RNS:
        """Enough primes that M/2 exceeds the largest value at the last (largest) scale."""
        final = scales(program, frac_bits)[-1]
        bits = math.ceil(math.log2(max(program.max_abs, 1.0)) + math.log2(final)) + 2
        widest = max(max(layer.matrix.shape[0] for layer in program.layers if layer.kind == "affine"), 1)
        if widest >= 2 ** (63 - 2 * RNS_PRIME_BITS):
            raise ConfigError(f"secret sharing: a layer with {widest} inputs overflows int64 matrix products in RNS")
        return cls(frac_bits, primes_below(2 ** RNS_PRIME_BITS, math.ceil(bits / (RNS_PRIME_BITS - 1))), final)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "frac_bits": self.frac_bits, "moduli": self.moduli, "final_scale": str(self.final_scale)}

    def _residues(self, values: np.ndarray) -> np.ndarray:
        """Residues of Python or machine integers, ``[words, *values.shape]``."""
        return np.stack([np.asarray(values % m, dtype=np.int64) for m in self.moduli])

    def encode_input(self, x: np.ndarray) -> np.ndarray:
        return self._residues(_scaled(x, self.frac_bits))

    def integer_layers(self, program: Layered) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Every affine layer in integers: the matrix at scale 2^f, the bias (Python integers) at
        2^f times its layer's input scale, so that it adds to ``x @ matrix``; ``None`` for a square."""
        return [(_scaled(layer.matrix, self.frac_bits),
                 _scaled(layer.bias, self.frac_bits).astype(object) * (scale // 2 ** self.frac_bits))
                if layer.kind == "affine" else None
                for layer, scale in zip(program.layers, scales(program, self.frac_bits), strict=True)]

    def weights(self, program: Layered) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """:meth:`integer_layers` as residues."""
        return [None if layer is None else (self._residues(layer[0]), self._residues(layer[1])[:, None])
                for layer in self.integer_layers(program)]

    def random(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self._m, size=shape, dtype=np.int64)

    def reduce(self, v: np.ndarray) -> np.ndarray:
        return v % self._m

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b % self._m

    def after(self, v: np.ndarray, party: int) -> np.ndarray:
        return v  # nothing to truncate: the scale grows instead

    def decode(self, v: np.ndarray) -> np.ndarray:
        """Chinese remaindering to integers in (-M/2, M/2], divided by the last layer's scale."""
        total = np.zeros(v.shape[1:], dtype=object)
        for residues, m in zip(v, self.moduli, strict=True):
            rest = self.modulus // m
            total = total + residues.astype(object) * (rest * pow(rest, -1, m))
        total = total % self.modulus
        return _divided(np.where(total > self.modulus // 2, total - self.modulus, total), self.final_scale)

    def check(self, v: np.ndarray, field: str) -> np.ndarray:
        """Received words as residues: each below its prime."""
        signed = v.view(np.int64)
        if np.any((signed < 0) | (signed >= self._m)):
            raise ShareError(field, f"a residue outside [0, m) for the moduli {self.moduli}")
        return signed

    def reference(self, program: Layered, x: np.ndarray) -> np.ndarray:
        """The quantised model evaluated exactly in Python integers: what the servers compute."""
        v = _scaled(x, self.frac_bits).astype(object)
        for layer in self.integer_layers(program):
            v = v * v if layer is None else v.dot(layer[0].astype(object)) + layer[1]
        return _divided(v, self.final_scale)


def _divided(values: np.ndarray, scale: int) -> np.ndarray:
    """Python integers divided by ``scale``, as float64 (correctly rounded, whatever their size)."""
    return np.array([value / scale for value in values.ravel()], dtype=np.float64).reshape(values.shape)


class ShareError(DataError):
    """A malformed or mismatched message between the client and the servers; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def arithmetic_from(params: dict[str, Any]) -> Arithmetic:
    """The number system ``params`` (from :meth:`params`) describe."""
    if params.get("name") == "ring64":
        return Ring64(params["frac_bits"])
    if params.get("name") == "rns":
        return RNS(params["frac_bits"], params["moduli"], int(params["final_scale"]))
    raise ConfigError(f"secret sharing: arithmetic must be ring64 or rns, got {params.get('name')!r}")
