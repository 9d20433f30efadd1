"""The server side: evaluate an :class:`HEProgram` on ciphertexts with a public context only.

- ``throughput``: one SIMD slot per image (CryptoNets layout). The client sends one ciphertext
  per pixel; each layer is a plaintext-weighted sum of ciphertexts (zeros skipped, one rescale
  per output) or a square, evaluated with SEAL's evaluator directly: a thousand images cost
  the same as one.
- ``latency``: one image per ciphertext, its pixels repeated over the slots; every layer (the
  convolution included, as a dense matrix) is a diagonal matrix-vector product with baby and
  giant steps (:mod:`medsec.crypto.he.diagonal`): a few dozen rotations per image.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from medsec.crypto.he.compiler import HEProgram, Layer
from medsec.crypto.he.diagonal import DiagonalPlan, plan_layer
from medsec.crypto.he.wire import HEInputError, ciphertext_from_bytes, ciphertext_to_bytes, load_public_context
from medsec.errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("throughput", "latency")


class HEServer:
    """Holds the compiled model and one client's public context (never a secret key)."""

    def __init__(self, program: HEProgram, context_data: bytes) -> None:
        self.program = program
        self.context = load_public_context(context_data)
        first = self.context.seal_context().data.first_context_data()
        self.levels = first.chain_index()
        if self.levels < program.depth:
            raise HEInputError("context", f"its modulus chain allows {self.levels} rescales, the model needs "
                                          f"{program.depth}")
        self.slots = first.parms().poly_modulus_degree() // 2
        self._plans: list[DiagonalPlan | None] | None = None
        self._plaintexts: dict[tuple, sealapi.Plaintext] = {}  # encoded diagonals, reused across requests
        log.info("public context loaded (%d slots, %d levels; no secret key)", self.slots, self.levels)

    def evaluate(self, mode: str, blobs: Sequence[bytes]) -> list[bytes]:
        """Encrypted logits for the ciphertexts in ``blobs`` (see the module doc for the layout)."""
        if mode == "throughput":
            return self._throughput(blobs)
        if mode == "latency":
            return self._latency(blobs)
        raise HEInputError("mode", f"must be one of {MODES}, got {mode!r}")

    def _throughput(self, blobs: Sequence[bytes]) -> list[bytes]:
        features = int(np.prod(self.program.input_shape))
        if len(blobs) != features:
            raise HEInputError("ciphertexts", f"expected {features} ciphertexts (one per pixel of "
                                              f"{'x'.join(map(str, self.program.input_shape))}), got {len(blobs)}")
        values = [ciphertext_from_bytes(self.context, blob, f"ciphertexts[{i}]") for i, blob in enumerate(blobs)]
        kernel = SlotKernel(self.context)
        for layer in self.program.layers:
            values = kernel.square(values) if layer.kind == "square" else kernel.affine(values, layer)
        return [ciphertext_to_bytes(value) for value in values]

    def _latency(self, blobs: Sequence[bytes]) -> list[bytes]:
        if not self.context.has_galois_keys():
            raise HEInputError("context", "latency mode needs Galois keys (rotations); the context has none")
        if not blobs:
            raise HEInputError("ciphertexts", "expected one ciphertext per image, got none")
        if self._plans is None:
            self._plans = self.program.diagonal_plans(self.slots)
        values = [ciphertext_from_bytes(self.context, blob, f"ciphertexts[{i}]") for i, blob in enumerate(blobs)]
        kernel = RotationKernel(self.context, self._plaintexts)
        out = []
        for value in values:
            for plan in self._plans:
                value = kernel.square([value])[0] if plan is None else plan.apply(value, kernel)
            out.append(ciphertext_to_bytes(value))
        return out


class SlotKernel:
    """Layer arithmetic on lists of SEAL ciphertexts (one value per slot), through SEAL's own
    evaluator: a product per non-zero weight at the input's level, one rescale per output."""

    def __init__(self, context: ts.Context) -> None:
        seal_context = context.seal_context().data
        self.evaluator = sealapi.Evaluator(seal_context)
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.relin_keys = context.relin_keys().data
        self.scale = context.global_scale

    def _constant(self, value: float, like: sealapi.Ciphertext, scale: float) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        self.encoder.encode(float(value), like.parms_id(), scale, plain)
        return plain

    def affine(self, values: list[sealapi.Ciphertext], layer: Layer) -> list[sealapi.Ciphertext]:
        out = []
        for column, bias in zip(layer.matrix.T, layer.bias):
            rows = np.flatnonzero(column)
            if not len(rows):
                raise ConfigError("model: a layer has an output with only zero weights; CKKS cannot encrypt it "
                                  "on the server")
            total = None
            for row in rows:
                product = sealapi.Ciphertext()
                self.evaluator.multiply_plain(values[row], self._constant(column[row], values[row], self.scale), product)
                if total is None:
                    total = product
                else:
                    self.evaluator.add_inplace(total, product)
            self.evaluator.rescale_to_next_inplace(total)
            self.evaluator.add_plain_inplace(total, self._constant(bias, total, total.scale))
            out.append(total)
        return out

    def square(self, values: list[sealapi.Ciphertext]) -> list[sealapi.Ciphertext]:
        out = []
        for value in values:
            result = sealapi.Ciphertext()
            self.evaluator.square(value, result)
            self.evaluator.relinearize_inplace(result, self.relin_keys)
            self.evaluator.rescale_to_next_inplace(result)
            out.append(result)
        return out


class RotationKernel(SlotKernel):
    """:class:`~medsec.crypto.he.diagonal.VectorOps` on SEAL ciphertexts, with the plaintext
    diagonals encoded once per layer and level and kept in ``cache``."""

    def __init__(self, context: ts.Context, cache: dict[tuple, sealapi.Plaintext]) -> None:
        super().__init__(context)
        self.galois_keys = context.galois_keys().data
        self.cache = cache

    def _plain(self, key: tuple, values: np.ndarray, like: sealapi.Ciphertext, scale: float) -> sealapi.Plaintext:
        key = (*key, tuple(like.parms_id()))
        if key not in self.cache:
            plain = sealapi.Plaintext()
            self.encoder.encode(values.tolist(), like.parms_id(), scale, plain)
            self.cache[key] = plain
        return self.cache[key]

    def rotate(self, v: sealapi.Ciphertext, steps: int) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.rotate_vector(v, steps, self.galois_keys, out)
        return out

    def multiply_plain(self, v: sealapi.Ciphertext, key: tuple, values: np.ndarray) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.multiply_plain(v, self._plain(key, values, v, self.scale), out)
        return out

    def add(self, a: sealapi.Ciphertext, b: sealapi.Ciphertext) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def rescale(self, v: sealapi.Ciphertext) -> sealapi.Ciphertext:
        self.evaluator.rescale_to_next_inplace(v)
        return v

    def add_plain(self, v: sealapi.Ciphertext, key: tuple, values: np.ndarray) -> sealapi.Ciphertext:
        self.evaluator.add_plain_inplace(v, self._plain(key, values, v, v.scale))
        return v
