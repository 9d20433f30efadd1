"""The server side: evaluate an :class:`HEProgram` on ciphertexts with a public context only.

- ``throughput``: one SIMD slot per image (CryptoNets layout). The client sends one ciphertext
  per pixel; each layer is a plaintext-weighted sum of ciphertexts (zeros skipped, one rescale
  per output) or a square, evaluated with SEAL's evaluator directly: a thousand images cost
  the same as one.
- ``latency``: one image per ciphertext (TenSEAL's im2col convolution, then vector-matrix
  products with rotations), for a single urgent image.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from medsec.crypto.he.compiler import HEProgram, Layer
from medsec.crypto.he.wire import (
    HEInputError,
    ciphertext_from_bytes,
    ciphertext_to_bytes,
    load_public_context,
    vector_from_bytes,
)
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
        if self.levels < self.program.levels("latency"):
            raise HEInputError("context", f"its modulus chain allows {self.levels} rescales, latency mode needs "
                                          f"{self.program.levels('latency')}")
        channels = self.program.input_shape[0]
        size = self.program.im2col_size()
        if not blobs or len(blobs) % channels:
            raise HEInputError("ciphertexts", f"expected a multiple of {channels} im2col vectors (one per channel "
                                              f"and image), got {len(blobs)}")
        vectors = [vector_from_bytes(self.context, blob, f"ciphertexts[{i}]", size) for i, blob in enumerate(blobs)]
        return [self._latency_one(vectors[i:i + channels]).serialize() for i in range(0, len(vectors), channels)]

    def _latency_one(self, channels: list[ts.CKKSVector]) -> ts.CKKSVector:
        conv, windows = self.program.conv, self.program.windows()
        bias = conv.bias.reshape(len(conv.kernel), windows)[:, 0]  # no padding: one bias per channel
        maps = []
        for out, weights in enumerate(conv.kernel):
            total = channels[0].conv2d_im2col(weights[0].tolist(), windows)
            for vector, kernel in zip(channels[1:], weights[1:]):
                total = total + vector.conv2d_im2col(kernel.tolist(), windows)
            maps.append(total + float(bias[out]))
        x = ts.CKKSVector.pack_vectors(maps)
        for layer in self.program.layers[1:]:
            x = x.square() if layer.kind == "square" else x.mm(layer.matrix.tolist()) + layer.bias.tolist()
        return x


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
