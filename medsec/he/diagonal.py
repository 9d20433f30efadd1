"""Matrix-vector products on one ciphertext per image: the hybrid diagonal method with baby and
giant steps, compiled for a layer once and run on any vector arithmetic (SEAL or NumPy).

An affine layer ``y = x @ W + b`` (``W``: [n_in, n_out]) is evaluated on a vector ``x`` that repeats
with period ``n`` (a power of two, at least ``n_in`` and ``n_out``) over all slots. With ``m`` the
power of two at least ``n_out`` and the generalised diagonals ``d_i[j] = W[(j + i) mod n, j mod m]``,

    z = sum_{i < m} d_i * rot(x, i),        y[r] = sum_{t < n / m} z[r + t m]

(``rot(v, k)[j] = v[j + k]``, SEAL's left rotation). Splitting ``i = g B + b`` (``B`` baby steps, ``G``
giant steps) needs ``B - 1`` rotations of ``x`` by one slot and ``G - 1`` rotations by ``B``
(Horner's scheme), with the diagonals pre-rotated in plaintext; the fold takes ``log2(n / m)``
rotations. Every rotation is by a power of two, so each costs one key switch with the standard
Galois keys. The output repeats with period ``m``: it is the next layer's input as it stands.
A 784 -> 256 convolution takes 30 + 2 rotations instead of one per input value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from medsec.errors import ConfigError

V = TypeVar("V")


def next_pow2(k: int) -> int:
    return 1 << max(0, (k - 1).bit_length())


class VectorOps(Protocol[V]):
    """The arithmetic a :class:`DiagonalPlan` needs; ``key`` names a cached plaintext."""

    def rotate(self, v: V, steps: int) -> V: ...
    def multiply_plain(self, v: V, key: tuple, values: np.ndarray) -> V: ...
    def add(self, a: V, b: V) -> V: ...
    def rescale(self, v: V) -> V: ...
    def add_plain(self, v: V, key: tuple, values: np.ndarray) -> V: ...


@dataclass
class DiagonalPlan(Generic[V]):
    """One affine layer compiled for ``slots`` slots: non-zero pre-rotated diagonals by (giant, baby)
    step, and the bias repeated with the output's period."""

    name: str
    n: int
    m: int
    baby: int
    giant: int
    diagonals: dict[tuple[int, int], np.ndarray]
    bias: np.ndarray

    @property
    def rotations(self) -> int:
        """Key switches one evaluation costs."""
        giants = {g for g, _ in self.diagonals}
        return (self.baby - 1) + (max(giants) if giants else 0) + int(math.log2(self.n // self.m))

    def apply(self, x: V, ops: VectorOps[V]) -> V:
        """``x @ W + b`` on ``x`` (period ``n``), rescaled once; the result has period ``m``."""
        babies = [x]
        for _ in range(1, self.baby):
            babies.append(ops.rotate(babies[-1], 1))
        total = None
        for g in reversed(range(self.giant)):
            if total is not None:
                total = ops.rotate(total, self.baby)
            for b in range(self.baby):
                if (g, b) in self.diagonals:
                    product = ops.multiply_plain(babies[b], (self.name, g, b), self.diagonals[g, b])
                    total = product if total is None else ops.add(total, product)
        if total is None:
            raise ConfigError(f"model: layer {self.name} has only zero weights; CKKS cannot encrypt its output "
                              "on the server")
        total = ops.rescale(total)
        step = self.n // 2
        while step >= self.m:
            total = ops.add(total, ops.rotate(total, step))
            step //= 2
        return ops.add_plain(total, (self.name, "bias"), self.bias)


def _geometry(n_in: int, n_out: int) -> tuple[int, int, int, int]:
    """The input period ``n``, output period ``m``, baby and giant steps of an ``n_in -> n_out`` layer."""
    m = next_pow2(n_out)
    baby = 1 << math.ceil(math.log2(m) / 2)
    return max(next_pow2(n_in), m), m, baby, -(-m // baby)


def rotation_steps(shapes: list[tuple[int, int]]) -> list[int]:
    """Every rotation (in slots, all powers of two) the layers of these ``[n_in, n_out]`` shapes
    take: one slot and the giant step in the products, then the folds. A client needs Galois keys
    for these only."""
    steps = set()
    for n_in, n_out in shapes:
        n, m, baby, giant = _geometry(n_in, n_out)
        steps |= ({1} if baby > 1 else set()) | ({baby} if giant > 1 else set())
        steps |= {n >> k for k in range(1, int(math.log2(n // m)) + 1)}
    return sorted(steps)


def plan_layer(name: str, matrix: np.ndarray, bias: np.ndarray, slots: int) -> DiagonalPlan:
    """Compile ``x @ matrix + bias`` for vectors of ``slots`` slots (a power of two)."""
    n_in, n_out = matrix.shape
    n, m, baby, giant = _geometry(n_in, n_out)
    if slots % n:
        raise ConfigError(f"model: layer {name} needs {n} slots per image, the ciphertext has {slots}")
    padded = np.zeros((n, m))
    padded[:n_in, :n_out] = matrix
    j = np.arange(n)
    diagonals = {}
    for i in range(m):
        diagonal = padded[(j + i) % n, j % m]
        if np.any(diagonal):
            g, b = divmod(i, baby)
            diagonals[g, b] = np.roll(np.tile(diagonal, slots // n), g * baby)  # pre-rotated by -g B
    full_bias = np.zeros(m)
    full_bias[:n_out] = bias
    return DiagonalPlan(name, n, m, baby, giant, diagonals, np.tile(full_bias, slots // m))


def replicate(x: np.ndarray, slots: int) -> np.ndarray:
    """``x`` zero-padded to a power of two and repeated over ``slots`` slots: the input layout."""
    period = next_pow2(len(x))
    padded = np.zeros(period)
    padded[:len(x)] = x
    return np.tile(padded, slots // period)


class NumpyOps:
    """The same arithmetic in float64 (no encryption): the reference for tests."""

    def rotate(self, v: np.ndarray, steps: int) -> np.ndarray:
        return np.roll(v, -steps)

    def multiply_plain(self, v: np.ndarray, key: tuple, values: np.ndarray) -> np.ndarray:
        return v * values

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def rescale(self, v: np.ndarray) -> np.ndarray:
        return v

    def add_plain(self, v: np.ndarray, key: tuple, values: np.ndarray) -> np.ndarray:
        return v + values
