"""The server side: evaluate an :class:`HEProgram` on ciphertexts with a public context only.

- ``throughput``: one SIMD slot per image (CryptoNets layout). The client sends one ciphertext
  per pixel; each layer is a plaintext-weighted sum of ciphertexts (zeros skipped, one rescale
  per output) or a square, evaluated with SEAL's evaluator directly: a thousand images cost
  the same as one.
- ``latency``: one image per ciphertext, its pixels repeated over the slots; every layer (the
  convolution included, as a dense matrix) is a diagonal matrix-vector product with baby and
  giant steps (:mod:`medsec.he.diagonal`): a few dozen rotations per image.

Every SEAL/TenSEAL error during an evaluation is the client's input's doing (the program was
checked when it was compiled), so it becomes an :class:`HEInputError` naming ``ciphertexts``. An
optional ``cancel`` event (set by the service when the client goes away) is checked between
ciphertexts, layers, outputs and images, and stops the work with :class:`EvaluationCancelled`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import tenseal as ts
from tenseal import sealapi

from medsec.core.layers import Layer
from medsec.errors import ConfigError, MedsecError
from medsec.he.compiler import HEProgram
from medsec.he.diagonal import DiagonalPlan
from medsec.he.planner import CKKSParams
from medsec.he.wire import (
    HEInputError,
    ciphertext_from_bytes,
    ciphertext_to_bytes,
    load_public_context,
    matching_modes,
)

log = logging.getLogger(__name__)
MODES = ("throughput", "latency")


class EvaluationCancelled(MedsecError):
    """The evaluation was stopped through its ``cancel`` event (the client went away); ``done``
    of ``total`` steps (images in latency mode, layers in throughput mode) had finished."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"evaluation cancelled after {done} of {total} steps")
        self.done, self.total = done, total


class Canceller:
    """Raises :class:`EvaluationCancelled` at a check once ``event`` is set."""

    def __init__(self, event: threading.Event | None, total: int) -> None:
        self.event, self.total, self.done = event, total, 0

    def check(self) -> None:
        if self.event is not None and self.event.is_set():
            raise EvaluationCancelled(self.done, self.total)


class HEServer:
    """Holds the compiled model and one client's public context (never a secret key).

    With ``params`` (the model card's CKKS parameters per mode), the context must have one mode's
    polynomial degree, modulus chain and scale, and only those modes are evaluated with it; with
    ``max_inflated``, its keys may take at most that many bytes once decompressed.
    """

    def __init__(self, program: HEProgram, context_data: bytes, params: Mapping[str, CKKSParams] | None = None,
                 max_inflated: int | None = None) -> None:
        self.program = program
        self.context = load_public_context(context_data, params, max_inflated)
        self.modes = MODES if params is None else matching_modes(self.context, params)
        self._lock = threading.Lock()
        first = self.context.seal_context().data.first_context_data()
        self.levels = first.chain_index()
        if self.levels < program.depth:
            raise HEInputError("context", f"its modulus chain allows {self.levels} rescales, the model needs "
                                          f"{program.depth}")
        self.slots = first.parms().poly_modulus_degree() // 2
        self._plans: list[DiagonalPlan | None] | None = None
        self._plaintexts: dict[tuple, sealapi.Plaintext] = {}  # encoded diagonals, reused across requests
        log.info("public context loaded (%d slots, %d levels; no secret key)", self.slots, self.levels)

    def has_secret_key(self) -> bool:
        return self.context.has_secret_key()

    def evaluate(self, mode: str, blobs: Sequence[bytes], cancel: threading.Event | None = None) -> list[bytes]:
        """Encrypted logits for the ciphertexts in ``blobs`` (see the module doc for the layout).

        Raises:
            HEInputError: malformed or mismatched ciphertexts, or any SEAL error they cause
                (``field`` names the ciphertext, or ``ciphertexts``).
            EvaluationCancelled: ``cancel`` was set.
        """
        if mode not in MODES:
            raise HEInputError("mode", f"must be one of {MODES}, got {mode!r}")
        if mode not in self.modes:
            raise HEInputError("context", f"was made for the model card's {'/'.join(self.modes)} parameters, not "
                                          f"{mode}'s; upload a context for {mode} (GET /model)")
        try:
            return self._throughput(blobs, cancel) if mode == "throughput" else self._latency(blobs, cancel)
        except MedsecError:  # HEInputError, EvaluationCancelled, the program's own ConfigError
            raise
        except Exception as err:  # SEAL: transparent result, scale out of bounds, mismatched parameters ...
            text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            log.warning("evaluation refused: SEAL %s: %s", type(err).__name__, text)
            raise HEInputError("ciphertexts", "the evaluation failed on these ciphertexts "
                                              f"(SEAL: {text or type(err).__name__})") from None

    def _load(self, blobs: Sequence[bytes], cancel: Canceller) -> list[sealapi.Ciphertext]:
        values = []
        for i, blob in enumerate(blobs):
            cancel.check()
            values.append(ciphertext_from_bytes(self.context, blob, f"ciphertexts[{i}]"))
        return values

    def _throughput(self, blobs: Sequence[bytes], event: threading.Event | None) -> list[bytes]:
        features = int(np.prod(self.program.input_shape))
        if len(blobs) != features:
            raise HEInputError("ciphertexts", f"expected {features} ciphertexts (one per pixel of "
                                              f"{'x'.join(map(str, self.program.input_shape))}), got {len(blobs)}")
        cancel = Canceller(event, len(self.program.layers))
        values = self._load(blobs, cancel)
        kernel = SlotKernel(self.context, cancel)
        for layer in self.program.layers:
            cancel.check()
            values = kernel.square(values) if layer.kind == "square" else kernel.affine(values, layer)
            cancel.done += 1
        return [ciphertext_to_bytes(value) for value in values]

    def _latency(self, blobs: Sequence[bytes], event: threading.Event | None) -> list[bytes]:
        if not self.context.has_galois_keys():
            raise HEInputError("context", "latency mode needs Galois keys (rotations); the context has none")
        if not blobs:
            raise HEInputError("ciphertexts", "expected one ciphertext per image, got none")
        with self._lock:  # concurrent requests of one session share the plans
            if self._plans is None:
                self._plans = self.program.diagonal_plans(self.slots)
        cancel = Canceller(event, len(blobs))
        values = self._load(blobs, cancel)
        kernel = RotationKernel(self.context, self._plaintexts, cancel)
        out = []
        for value in values:
            for plan in self._plans:
                cancel.check()
                value = kernel.square([value])[0] if plan is None else plan.apply(value, kernel)
            out.append(ciphertext_to_bytes(value))
            cancel.done += 1
        return out


class SlotKernel:
    """Layer arithmetic on lists of SEAL ciphertexts (one value per slot), through SEAL's own
    evaluator: a product per non-zero weight at the input's level, one rescale per output."""

    def __init__(self, context: ts.Context, cancel: Canceller | None = None) -> None:
        self.cancel = cancel or Canceller(None, 0)
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
            self.cancel.check()
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
    """:class:`~medsec.he.diagonal.VectorOps` on SEAL ciphertexts, with the plaintext
    diagonals encoded once per layer and level and kept in ``cache``."""

    def __init__(self, context: ts.Context, cache: dict[tuple, sealapi.Plaintext],
                 cancel: Canceller | None = None) -> None:
        super().__init__(context, cancel)
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
