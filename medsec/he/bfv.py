"""BFV: the he_cnn quantised to integers and evaluated *exactly* on encrypted integers (TenSEAL/SEAL).

Quantisation (:func:`quantise`): pixels in [0, 1] become integers ``0 .. 2^input_bits - 1`` (exact
for 8-bit images at ``input_bits=8``); each affine layer's weights become signed integers of
``weight_bits`` bits (one scale per layer: its largest weight maps to ``2^(weight_bits-1) - 1``), its
bias an integer at the scale of ``x @ W``. Nothing is ever rounded again: a square squares the
scale, so the logits are exact integers at a known ``output_scale``, and the encrypted model equals
the quantised model bit for bit.

Overflow is impossible by construction: interval arithmetic over *every* input in [0, 1] (not a
calibration set) bounds each layer's integers (:attr:`QuantisedProgram.bounds`), and the planner
(:func:`plan_bfv`) takes plain moduli whose product (Chinese remaindering over ``k`` batching
primes, one TenSEAL context per prime, as CryptoNets did) exceeds twice the largest bound. It also
keeps SEAL's noise budget positive through the whole evaluation (costs measured on SEAL: a square
takes about ``log2 t + log2 N`` bits, a product with a slot-wise plaintext ``log2 t + log2 N / 2``,
one with a constant ``log2 |w|``), with a 10-bit margin; the client checks what is left on every
result. A model that cannot fit gets a :class:`~medsec.errors.ConfigError` naming the layer.

Layouts as for CKKS: ``throughput`` puts one image in each of the N slots (a weight is a constant,
so an affine layer costs only ``log2 |w|`` bits of noise), ``latency`` one image per ciphertext
(both rows of SEAL's 2 x N/2 slot matrix hold it) with the diagonal method of
:mod:`medsec.he.diagonal` on row rotations.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
from tenseal import sealapi

from medsec.errors import ConfigError, DataError
from medsec.he.compiler import HEProgram
from medsec.he.diagonal import DiagonalPlan, next_pow2, plan_layer, replicate, rotation_steps
from medsec.he.evaluator import MODES
from medsec.he.wire import (
    HEInputError,
    _seal_object_size,
    ciphertext_to_bytes,
    context_bytes,
    context_parameters,
    load_ciphertext,
    load_context,
    pack,
    unpack,
)

log = logging.getLogger(__name__)
DEGREES = (4096, 8192, 16384, 32768)
MAX_PLAIN_PRIMES = 4
MAX_PLAIN_BITS = 50
"""Plain primes stay below 2^50 so that residues and diagonals are exact in float64."""
FRESH_LOSS_BITS = 10
MARGIN_BITS = 10


# ---- quantisation ------------------------------------------------------------------------------
@dataclass
class IntegerLayer:
    """``x @ matrix + bias`` in integers (``bias``: Python integers) or ``x * x``."""

    kind: str
    matrix: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass
class QuantisedProgram:
    """The integer model: layers, the (C, H, W) input, the classes, the input's integer scale, the
    logits' scale and each layer's worst-case largest magnitude over all inputs in [0, 1]."""

    layers: list[IntegerLayer]
    input_shape: tuple[int, int, int]
    num_classes: int
    input_bits: int
    weight_bits: int
    output_scale: float
    bounds: list[int]
    max_abs: float = 0.0
    """The float program's calibrated peak (reported; the planner uses :attr:`bounds`)."""

    @property
    def input_scale(self) -> int:
        return 2 ** self.input_bits - 1

    @property
    def value_bits(self) -> int:
        """Bits a signed integer of the largest bound takes."""
        return max(self.bounds).bit_length() + 1

    def encode_input(self, x: np.ndarray) -> np.ndarray:
        """Pixels ``[n, features]`` in [0, 1] as the integers the model takes (int64)."""
        return np.rint(np.clip(x, 0.0, 1.0) * self.input_scale).astype(np.int64)

    def integers(self, x: np.ndarray) -> np.ndarray:
        """The quantised model evaluated exactly on ``[n, features]`` pixels: int64 while every
        partial sum provably fits, Python integers (an object array) after."""
        v, peak = self.encode_input(x), self.input_scale
        for layer, bound in zip(self.layers, self.bounds, strict=True):
            if layer.kind == "affine":
                widest = peak * int(np.abs(layer.matrix).sum(axis=0).max()) + max(abs(int(b)) for b in layer.bias)
                if widest >= 2 ** 62 and v.dtype != object:
                    v = v.astype(object)
                matrix = layer.matrix.astype(object) if v.dtype == object else layer.matrix
                v = v @ matrix + (layer.bias if v.dtype == object else layer.bias.astype(np.int64))
            else:
                if bound >= 2 ** 62 and v.dtype != object:
                    v = v.astype(object)
                v = v * v
            peak = bound
        return v

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The quantised model's logits (float64): :meth:`integers` over :attr:`output_scale`."""
        return decode(self.integers(x), self.output_scale)

    def plan(self, mode: str, batch_size: int = 1) -> BFVParams:
        if mode == "throughput":
            return plan_bfv(self, mode, batch_size)
        steps = rotation_steps([layer.matrix.shape for layer in self.layers if layer.kind == "affine"])
        return dataclasses.replace(plan_bfv(self, mode, self.latency_slots()), rotation_steps=tuple(steps))

    def latency_slots(self) -> int:
        return max(next_pow2(max(layer.matrix.shape)) for layer in self.layers if layer.kind == "affine")

    def card(self, precision_bits: int | None = None) -> BFVCard:
        """The public description a client needs (``precision_bits`` is CKKS's; BFV is exact)."""
        return BFVCard(self.input_shape, self.num_classes, self.input_bits, self.output_scale,
                       {mode: self.plan(mode) for mode in MODES})


def decode(values: np.ndarray, scale: float) -> np.ndarray:
    """Integers (any size) divided by ``scale``, as float64."""
    return np.array([int(v) / scale for v in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))


def quantise(program: HEProgram, input_bits: int = 8, weight_bits: int = 6) -> QuantisedProgram:
    """``program`` (a compiled he_cnn) in integers, with worst-case bounds for inputs in [0, 1]."""
    if not 2 <= input_bits <= 16 or not 2 <= weight_bits <= 16:
        raise ConfigError(f"bfv: input_bits and weight_bits must be within 2..16, got {input_bits} and {weight_bits}")
    scale = float(2 ** input_bits - 1)
    low = np.zeros(int(np.prod(program.input_shape)), dtype=object)
    high = np.full(low.shape, 2 ** input_bits - 1, dtype=object)
    layers, bounds = [], []
    for index, layer in enumerate(program.layers):
        if layer.kind == "square":
            layers.append(IntegerLayer("square"))
            low, high = np.where((low < 0) & (high > 0), 0, np.minimum(low * low, high * high)), \
                np.maximum(low * low, high * high)
            scale = scale * scale
        else:
            peak = float(np.abs(layer.matrix).max())
            if peak == 0:
                raise ConfigError(f"bfv: layer {index} has only zero weights")
            weight_scale = (2 ** (weight_bits - 1) - 1) / peak
            matrix = np.rint(layer.matrix * weight_scale).astype(np.int64)
            scale *= weight_scale
            bias = np.array([round(b * scale) for b in layer.bias], dtype=object)
            positive, negative = np.maximum(matrix, 0).astype(object), np.minimum(matrix, 0).astype(object)
            low, high = low @ positive + high @ negative + bias, high @ positive + low @ negative + bias
            layers.append(IntegerLayer("affine", matrix, bias))
        bounds.append(int(max(np.abs(low).max(), np.abs(high).max())))
    return QuantisedProgram(layers, program.input_shape, program.num_classes, input_bits, weight_bits, scale, bounds,
                            program.max_abs)


# ---- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BFVParams:
    """A BFV parameter set: SEAL's 128-bit-secure coefficient modulus for N (special prime last)
    and one plain modulus (a batching prime) per context."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_moduli: tuple[int, ...]
    noise_left_bits: int
    rotation_steps: tuple[int, ...] = ()
    """Latency layout: the row rotations the evaluation takes (Galois keys for these only)."""

    @property
    def slots(self) -> int:
        """Images per throughput ciphertext: every slot of both rows."""
        return self.poly_modulus_degree

    @property
    def plain_bits(self) -> int:
        return math.prod(self.plain_moduli).bit_length()

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "plain_moduli": list(self.plain_moduli), "rotation_steps": list(self.rotation_steps),
                "plain_bits": self.plain_bits, "slots": self.slots}

    @classmethod
    def from_dict(cls, data: dict) -> BFVParams:
        try:
            return cls(int(data["poly_modulus_degree"]), tuple(int(b) for b in data["coeff_mod_bit_sizes"]),
                       tuple(int(t) for t in data["plain_moduli"]), int(data["noise_left_bits"]),
                       tuple(int(k) for k in data.get("rotation_steps", ())))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"params: not a BFV parameter set ({err})") from err


@dataclass(frozen=True)
class BFVCard:
    """What a client must know: input shape, classes, the input's integer bits, the logits' scale
    and the parameters of each mode. Public by design."""

    input_shape: tuple[int, int, int]
    num_classes: int
    input_bits: int
    output_scale: float
    params: dict[str, BFVParams]

    def to_dict(self) -> dict:
        return {"scheme": "bfv", "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "input_bits": self.input_bits, "output_scale": self.output_scale,
                "params": {mode: p.to_dict() for mode, p in self.params.items()}}


def coeff_modulus_bits(degree: int) -> tuple[int, ...]:
    """SEAL's default 128-bit-secure BFV coefficient modulus for ``degree``, in bits."""
    return tuple(m.bit_count() for m in sealapi.CoeffModulus.BFVDefault(degree, sealapi.SEC_LEVEL_TYPE.TC128))


def noise_costs(program: QuantisedProgram, degree: int, plain_bits: int, mode: str) -> list[int]:
    """Noise budget (bits) each layer consumes, from SEAL measurements (module doc)."""
    log_n = math.log2(degree)
    costs = []
    for layer in program.layers:
        if layer.kind == "square":
            cost = plain_bits + log_n + 2
        elif mode == "throughput":  # constants: the weight's size and the number of terms
            terms = int((layer.matrix != 0).sum(axis=0).max())
            cost = math.log2(int(np.abs(layer.matrix).max()) + 1) + math.log2(terms) + 1
        else:  # slot-wise plaintext diagonals, summed, plus rotations
            cost = plain_bits + log_n / 2 + 2 + math.log2(next_pow2(layer.matrix.shape[1])) + 4
        costs.append(math.ceil(cost))
    return costs


def plan_bfv(program: QuantisedProgram, mode: str, min_slots: int = 1) -> BFVParams:
    """The smallest N (then the fewest plain primes) whose plain moduli hold every worst-case value
    and whose noise budget lasts the evaluation with ``MARGIN_BITS`` to spare.

    Raises:
        ConfigError: nothing up to N=32768 and ``MAX_PLAIN_PRIMES`` primes of ``MAX_PLAIN_BITS``
            fits; names the layer where values or noise run out.
    """
    need = program.value_bits + 1
    for degree in DEGREES:
        slots = degree if mode == "throughput" else degree // 2
        if slots < min_slots:
            continue
        coeff = coeff_modulus_bits(degree)
        for count in range(1, MAX_PLAIN_PRIMES + 1):
            bits = max(math.ceil(need / count) + 1, int(math.log2(degree)) + 3)
            if bits > MAX_PLAIN_BITS:
                continue
            left = sum(coeff[:-1]) - bits - FRESH_LOSS_BITS - sum(noise_costs(program, degree, bits, mode))
            if left >= MARGIN_BITS:
                primes = tuple(p.value() for p in sealapi.PlainModulus.Batching(degree, [bits] * count))
                return BFVParams(degree, coeff, primes, left)
    raise ConfigError(_overflow_message(program, mode))


def _overflow_message(program: QuantisedProgram, mode: str) -> str:
    """Names the layer where the largest parameters run out of plain modulus or noise budget."""
    capacity = MAX_PLAIN_PRIMES * (MAX_PLAIN_BITS - 1) - 1
    for index, bound in enumerate(program.bounds):
        if bound.bit_length() + 1 > capacity:
            return (f"bfv: layer {index} ({program.layers[index].kind}) reaches 2^{bound.bit_length()} in the worst case "
                    f"over inputs in [0, 1], more than {MAX_PLAIN_PRIMES} plain primes of {MAX_PLAIN_BITS} bits hold; "
                    "lower bfv.weight_bits or bfv.input_bits, or use a shallower model")
    bits = max(math.ceil((program.value_bits + 1) / MAX_PLAIN_PRIMES) + 1, 18)
    budget = sum(coeff_modulus_bits(DEGREES[-1])[:-1]) - bits - FRESH_LOSS_BITS - MARGIN_BITS
    for index, cost in enumerate(noise_costs(program, DEGREES[-1], bits, mode)):
        budget -= cost
        if budget < 0:
            return (f"bfv: the noise budget runs out at layer {index} ({program.layers[index].kind}) even at N=32768 "
                    f"({mode} layout); lower bfv.weight_bits or bfv.input_bits, or use a shallower model")
    return f"bfv: no parameters fit the model in the {mode} layout"


# ---- the client ----------------------------------------------------------------------------------
class BFVClient:
    """Holds one BFV context (and its secret key) per plain prime; encrypts integer pixels,
    decrypts and Chinese-remainders the logits."""

    def __init__(self, card: BFVCard, mode: str) -> None:
        self.card, self.mode, self.params = card, mode, card.params[mode]
        p = self.params
        self.contexts = [ts.context(ts.SCHEME_TYPE.BFV, p.poly_modulus_degree, plain_modulus=t,
                                    coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
                                    encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC) for t in p.plain_moduli]
        self.galois = [galois_keys(context, p.rotation_steps) if mode == "latency" else b"" for context in self.contexts]
        log.info("BFV client: N=%d, %d plain primes (%d bits together); the secret keys stay in this process",
                 p.poly_modulus_degree, len(p.plain_moduli), p.plain_bits)

    def public_context(self) -> bytes:
        """Every context's public part, each followed by its Galois keys (empty in throughput
        mode), packed; no secret key."""
        return pack([blob for context, keys in zip(self.contexts, self.galois, strict=True)
                     for blob in (context_bytes(context), keys)])

    def batches(self, count: int) -> list[slice]:
        step = self.params.slots if self.mode == "throughput" else 1
        return [slice(i, min(i + step, count)) for i in range(0, count, step)]

    def encrypt(self, images: np.ndarray) -> list[bytes]:
        """Ciphertexts of ``images`` ([n, C, H, W] in [0, 1]), context by context."""
        if tuple(images.shape[1:]) != self.card.input_shape:
            raise ValueError(f"images are {list(images.shape[1:])}, the model takes {list(self.card.input_shape)}")
        scale = 2 ** self.card.input_bits - 1
        pixels = np.rint(np.clip(images.reshape(len(images), -1), 0.0, 1.0) * scale).astype(np.int64)
        if self.mode == "throughput":
            vectors = [column.tolist() for column in pixels.T]
        else:
            vectors = [np.tile(replicate(image, self.params.poly_modulus_degree // 2), 2).astype(np.int64).tolist()
                       for image in pixels]
        return [ciphertext_to_bytes(ts.bfv_vector(context, vector).ciphertext()[0])
                for context in self.contexts for vector in vectors]

    def decrypt_integers(self, blobs: Sequence[bytes], count: int) -> np.ndarray:
        """The logits as exact integers ``[count, classes]`` (an object array).

        Raises:
            DataError: an answer of the wrong size, or one whose noise budget ran out (its
                decryption would be wrong).
        """
        per_context = len(blobs) // len(self.contexts)
        if per_context * len(self.contexts) != len(blobs):
            raise DataError(f"server answer: {len(blobs)} ciphertexts for {len(self.contexts)} plain moduli")
        residues = [self._decrypt(context, blobs[i * per_context:(i + 1) * per_context], i)
                    for i, context in enumerate(self.contexts)]
        classes = self.card.num_classes
        if self.mode == "latency":
            residues = [r[:, :classes] for r in residues]
        else:
            residues = [r[:, :count].T for r in residues]
        return crt(residues, self.params.plain_moduli)

    def _decrypt(self, context: ts.Context, blobs: Sequence[bytes], index: int) -> np.ndarray:
        seal_context = context.seal_context().data
        decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)
        encoder, plain, rows = sealapi.BatchEncoder(seal_context), sealapi.Plaintext(), []
        for blob in blobs:
            ciphertext = load_ciphertext(seal_context, blob)
            if decryptor.invariant_noise_budget(ciphertext) <= 0:
                raise DataError(f"server answer: plain modulus {index} has no noise budget left; its decryption would be "
                                "wrong (the parameters are too small for the evaluation the server ran)")
            decryptor.decrypt(ciphertext, plain)
            rows.append(encoder.decode_uint64(plain))
        return np.array(rows, dtype=np.uint64)

    def decrypt(self, blobs: Sequence[bytes], count: int) -> np.ndarray:
        """Logits ``[count, classes]`` in float64: the integers over the card's output scale."""
        return decode(self.decrypt_integers(blobs, count), self.card.output_scale)


def galois_keys(context: ts.Context, steps: Sequence[int]) -> bytes:
    """Serialized SEAL Galois keys for the row rotations ``steps`` only (TenSEAL would make keys
    for every power of two, both ways: 2.7x the bytes at N=16384)."""
    seal_context = context.seal_context().data
    elements = seal_context.key_context_data().galois_tool().get_elts_from_steps(list(steps))
    keys = sealapi.GaloisKeys()
    sealapi.KeyGenerator(seal_context, context.secret_key().data).create_galois_keys(elements, keys)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "galois"
        keys.save(str(path))
        return path.read_bytes()


def load_galois_keys(context: ts.Context, blob: bytes, field: str, max_inflated: int | None) -> sealapi.GaloisKeys | None:
    """The Galois keys a client sent beside ``context`` (``None`` for none), bounded first."""
    if not blob:
        return None
    if max_inflated is not None and _seal_object_size(blob, max_inflated, field) > max_inflated:
        raise HEInputError(field, f"takes more than {max_inflated} bytes once decompressed, the service's limit")
    keys = sealapi.GaloisKeys()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "galois"
        path.write_bytes(blob)
        try:
            keys.load(context.seal_context().data, str(path))
        except Exception as err:
            raise HEInputError(field, f"not Galois keys for this context ({type(err).__name__})") from None
    return keys


def crt(residues: Sequence[np.ndarray], moduli: Sequence[int]) -> np.ndarray:
    """Signed integers (centred in (-M/2, M/2]) from their residues modulo each of ``moduli``."""
    modulus, total = math.prod(moduli), np.zeros(residues[0].shape, dtype=object)
    for values, m in zip(residues, moduli, strict=True):
        rest = modulus // m
        total = total + values.astype(object) * (rest * pow(rest, -1, m))
    total = total % modulus
    return np.where(total > modulus // 2, total - modulus, total)


# ---- the server ----------------------------------------------------------------------------------
class BFVServer:
    """Evaluates a :class:`QuantisedProgram` with public BFV contexts only (one per plain prime);
    with ``params``, the contexts must match the card's."""

    def __init__(self, program: QuantisedProgram, context_data: bytes, params: Mapping[str, BFVParams] | None = None,
                 max_inflated: int | None = None) -> None:
        self.program = program
        blobs = unpack(context_data, "context")
        if len(blobs) % 2 or not blobs:
            raise HEInputError("context", f"expected a (context, Galois keys) pair per plain modulus, got {len(blobs)} parts")
        self.contexts = [load_context(blob, max_inflated, f"context[{i}]") for i, blob in enumerate(blobs[::2])]
        self.galois = [load_galois_keys(context, blob, f"context[{i}].galois", max_inflated)
                       for i, (context, blob) in enumerate(zip(self.contexts, blobs[1::2], strict=True))]
        for i, context in enumerate(self.contexts):
            described = context_parameters(context)
            if described["scheme"] != "BFV":
                raise HEInputError(f"context[{i}]", f"scheme {described['scheme']}, the model needs BFV")
        self.moduli = tuple(c.seal_context().data.key_context_data().parms().plain_modulus().value()
                            for c in self.contexts)
        if params is not None and not any(p.plain_moduli == self.moduli for p in params.values()):
            raise HEInputError("context", f"plain moduli {list(self.moduli)} differ from the model card's")
        self.degree = context_parameters(self.contexts[0])["poly_modulus_degree"]
        self._plans: list[list[DiagonalPlan | None]] | None = None
        self._plaintexts: dict[tuple, sealapi.Plaintext] = {}

    def has_secret_key(self) -> bool:
        return any(context.has_secret_key() for context in self.contexts)

    def evaluate(self, mode: str, blobs: Sequence[bytes]) -> list[bytes]:
        """Encrypted logits, context by context (the client's order).

        Raises:
            HEInputError: a wrong count of ciphertexts, or one that is not a fresh ciphertext of
                its context (``field`` names it).
        """
        if mode not in MODES:
            raise HEInputError("mode", f"must be one of {MODES}, got {mode!r}")
        features = int(np.prod(self.program.input_shape))
        per_context, rest = divmod(len(blobs), len(self.contexts))
        if rest or not per_context or (mode == "throughput" and per_context != features):
            want = f"{features} per plain modulus (one per pixel)" if mode == "throughput" else "one per image and modulus"
            raise HEInputError("ciphertexts", f"expected {want} for {len(self.contexts)} moduli, got {len(blobs)}")
        out = []
        for index, context in enumerate(self.contexts):
            part = blobs[index * per_context:(index + 1) * per_context]
            values = [self._load(context, blob, f"ciphertexts[{index * per_context + i}]") for i, blob in enumerate(part)]
            ops = BFVOps(context, self.galois[index], self._plaintexts, index)
            results = self._throughput(values, ops) if mode == "throughput" else self._latency(values, ops, index)
            out += [ciphertext_to_bytes(value) for value in results]
        return out

    @staticmethod
    def _load(context: ts.Context, blob: bytes, field: str) -> sealapi.Ciphertext:
        seal_context = context.seal_context().data
        try:
            ciphertext = load_ciphertext(seal_context, blob)
        except Exception as err:
            raise HEInputError(field, f"not a ciphertext for the uploaded context ({type(err).__name__})") from None
        if ciphertext.size() != 2 or ciphertext.parms_id() != seal_context.first_parms_id() or ciphertext.is_ntt_form():
            raise HEInputError(field, "not a fresh BFV ciphertext of the uploaded context")
        if ciphertext.is_transparent():
            raise HEInputError(field, "transparent (its second component is zero: it encrypts nothing)")
        return ciphertext

    def _throughput(self, values: list[sealapi.Ciphertext], ops: BFVOps) -> list[sealapi.Ciphertext]:
        for layer in self.program.layers:
            if layer.kind == "square":
                values = [ops.square(v) for v in values]
                continue
            outputs = []
            for column, bias in zip(layer.matrix.T, layer.bias, strict=True):
                rows = np.flatnonzero(column)
                if not len(rows):
                    raise ConfigError("bfv: a layer has an output with only zero weights")
                total = ops.scaled(values[rows[0]], int(column[rows[0]]))
                for row in rows[1:]:
                    ops.evaluator.add_inplace(total, ops.scaled(values[row], int(column[row])))
                outputs.append(ops.add_constant(total, int(bias)))
            values = outputs
        return values

    def _latency(self, values: list[sealapi.Ciphertext], ops: BFVOps, index: int) -> list[sealapi.Ciphertext]:
        if self.galois[index] is None:
            raise HEInputError(f"context[{index}]", "latency mode needs Galois keys (rotations); the context has none")
        plans = self._latency_plans()[index]
        out = []
        for value in values:
            for plan in plans:
                value = ops.square(value) if plan is None else plan.apply(value, ops)
                ops.forget()
            out.append(value)
        return out

    def _latency_plans(self) -> list[list[DiagonalPlan | None]]:
        """Each affine layer's diagonal plan, per plain modulus (the bias as residues, centred)."""
        if self._plans is None:
            slots = self.degree // 2
            shared = [None if layer.kind == "square" else
                      plan_layer(f"{i}", layer.matrix.astype(np.float64), np.zeros(layer.matrix.shape[1]), slots)
                      for i, layer in enumerate(self.program.layers)]
            self._plans = [[None if plan is None else dataclasses.replace(
                plan, bias=np.tile(_padded(_centred(layer.bias, t), plan.m), slots // plan.m))
                for plan, layer in zip(shared, self.program.layers, strict=True)] for t in self.moduli]
        return self._plans


def _centred(values: np.ndarray, modulus: int) -> np.ndarray:
    """Integers as residues in (-t/2, t/2] (float64: exact below 2^53)."""
    residues = [int(v) % modulus for v in values]
    return np.array([r - modulus if r > modulus // 2 else r for r in residues], dtype=np.float64)


def _padded(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size)
    out[:len(values)] = values
    return out


class BFVOps:
    """SEAL BFV arithmetic for one context: constants (throughput) and the
    :class:`~medsec.he.diagonal.VectorOps` of the diagonal method (latency; no rescaling).

    Products with slot-wise plaintexts run in NTT form (the diagonals stored transformed, each
    rotated input transformed once and kept until :meth:`forget`): a pointwise product instead of
    three transforms per product, 12x faster at N=16384. SEAL rotates, squares and adds
    plaintexts to BFV ciphertexts in coefficient form only, so those transform back first."""

    def __init__(self, context: ts.Context, galois: sealapi.GaloisKeys | None, cache: dict[tuple, sealapi.Plaintext],
                 index: int) -> None:
        seal_context = context.seal_context().data
        self.evaluator, self.encoder = sealapi.Evaluator(seal_context), sealapi.BatchEncoder(seal_context)
        self.relin_keys = context.relin_keys().data
        self.galois_keys = galois
        self.modulus = seal_context.key_context_data().parms().plain_modulus().value()
        self.slots = seal_context.key_context_data().parms().poly_modulus_degree()
        self.cache, self.index = cache, index
        self.parms_id = seal_context.first_parms_id()
        self._transformed: dict[int, tuple[sealapi.Ciphertext, sealapi.Ciphertext]] = {}

    def _plain(self, key: tuple, values: np.ndarray | int, ntt: bool = False) -> sealapi.Plaintext:
        key = (self.index, ntt, *key)
        if key not in self.cache:
            plain = sealapi.Plaintext()
            if isinstance(values, int):
                plain = sealapi.Plaintext(f"{values % self.modulus:X}")  # a constant polynomial: every slot
            else:
                row = [int(v) % self.modulus for v in values]
                self.encoder.encode(row + row, plain)  # both rows hold the image
                if ntt:
                    self.evaluator.transform_to_ntt_inplace(plain, self.parms_id)
            self.cache[key] = plain
        return self.cache[key]

    def _ntt(self, v: sealapi.Ciphertext) -> sealapi.Ciphertext:
        if v.is_ntt_form():
            return v
        if id(v) not in self._transformed:  # the entry keeps ``v`` alive, so its id stays its own
            out = sealapi.Ciphertext()
            self.evaluator.transform_to_ntt(v, out)
            self._transformed[id(v)] = (v, out)
        return self._transformed[id(v)][1]

    def _coefficients(self, v: sealapi.Ciphertext) -> sealapi.Ciphertext:
        if not v.is_ntt_form():
            return v
        out = sealapi.Ciphertext()
        self.evaluator.transform_from_ntt(v, out)
        return out

    def forget(self) -> None:
        """Drop the transformed inputs kept since the last call (one layer's)."""
        self._transformed.clear()

    def scaled(self, v: sealapi.Ciphertext, weight: int) -> sealapi.Ciphertext:
        """``weight * v``: a product by ``|weight|``, negated for a negative weight (a constant
        near ``t`` would cost ``log2 t`` bits of noise, ``|weight|`` costs ``log2 |weight|``)."""
        out = sealapi.Ciphertext()
        self.evaluator.multiply_plain(v, self._plain(("w", abs(weight)), abs(weight)), out)
        if weight < 0:
            self.evaluator.negate_inplace(out)
        return out

    def add_constant(self, v: sealapi.Ciphertext, value: int) -> sealapi.Ciphertext:
        self.evaluator.add_plain_inplace(v, self._plain(("b", value), value))
        return v

    def square(self, v: sealapi.Ciphertext) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.square(self._coefficients(v), out)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        return out

    def rotate(self, v: sealapi.Ciphertext, steps: int) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.rotate_rows(self._coefficients(v), steps, self.galois_keys, out)
        return out

    def multiply_plain(self, v: sealapi.Ciphertext, key: tuple, values: np.ndarray) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.multiply_plain(self._ntt(v), self._plain(key, values, ntt=True), out)
        return out

    def add(self, a: sealapi.Ciphertext, b: sealapi.Ciphertext) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        if a.is_ntt_form() != b.is_ntt_form():
            a, b = self._ntt(a), self._ntt(b)
        self.evaluator.add(a, b, out)
        return out

    def rescale(self, v: sealapi.Ciphertext) -> sealapi.Ciphertext:
        return v  # BFV has no scale to bring down: the integers are exact

    def add_plain(self, v: sealapi.Ciphertext, key: tuple, values: np.ndarray) -> sealapi.Ciphertext:
        v = self._coefficients(v)
        self.evaluator.add_plain_inplace(v, self._plain(key, values))
        return v
