"""CKKS-encrypted aggregation for federated training: the server adds the sites' model updates as
TenSEAL CKKS ciphertexts and never sees one site's update in the clear.

Who holds the secret key, and what that implies
-----------------------------------------------
- **The sites** share one CKKS secret key. One site (or a key ceremony run for them) calls
  :func:`make_site_context`, which writes the whole TenSEAL context, secret key included, to a new
  file readable by its owner only (mode 600, never overwritten, as medsec's key files); the file
  goes to the other sites over a channel the server does not see, and each loads it with
  :func:`load_site_context` (refused unless a regular file of the current user, mode 600/400).
- **The server** gets :func:`public_context` only: no secret key and, the context being symmetric
  (only sites encrypt), no public key either. :class:`CKKSAggregation` refuses a context that holds
  a secret key.

So: the server alone learns nothing about the values; it sees ciphertexts, their sizes, the model's
shapes and dtypes (plain header) and each site's example count n_i (plain). Every site sees the
aggregate, which is the point: it is the next global model. Every site could also decrypt any other
site's update given its ciphertext: a site colluding with the server (or reading its traffic) learns
each site's update; one shared key protects against a curious server, not against a site plus the
server (threshold or multi-key CKKS would; not done). Integrity is not protected: the server can
add plaintexts to the aggregate or replace it, and a site can send any update it likes.

Protocol
--------
Site i flattens its parameters after local training (what FedAvg averages), multiplies them by its
example count n_i and encrypts them into CKKS vectors of ``slots`` values (:func:`ckks_mod`, on the
way out); n_i travels in the clear (``FitRes.num_examples`` and the header). The server checks and
adds the ciphertexts and the n_i (:class:`CKKSAggregation`); the encrypted sum and N = sum n_i are
the next round's global parameters, which :func:`ckks_mod` decrypts and divides by N before the
client code sees them. The server never divides (nor multiplies) a ciphertext. Round 1's model comes
from the server in the clear and passes through, as does a site's answer to the server's request for
initial parameters (FedAvg without ``initial_parameters``): an initialisation, nothing learnt from data.

Wire format: ``Parameters(tensor_type="medsec.ckks/1", tensors=[header, chunk_1, ...])``; the header
is JSON ``{"format", "examples", "arrays": [{"shape", "dtype"}, ...]}`` (bounded: at most
``MAX_ARRAYS`` arrays, ``MAX_VALUES`` values), each chunk a serialized TenSEAL ``CKKSVector`` of
``slots`` values (the last one shorter). Every read checks sizes before parsing, including what a
compressed SEAL object inflates to, and the ciphertexts after (one fresh, non-transparent
ciphertext at the top level, at the context's scale); a failure names the site and the tensor.

Parameters (:class:`AggregationParams`)
---------------------------------------
N = 8192 (4096 slots per ciphertext), coefficient modulus [60, 40, 60] bits (data primes 60 + 40,
special prime 60; 160 of the 218 bits 128-bit security allows), scale 2^40. Additions never
rescale, so ciphertexts stay at the top level, whose modulus has 100 bits: sums up to 2^59 decode,
and a site's weighted values are held below 2^40 (room for 2^19 sites). Measured (3 sites, small
CNN): the decrypted sum of n_i w_i is within 2e-13 (relative) of float64, so the averaged model
differs from plain FedAvg only by float32 rounding (1e-7). A chunk of 4096 values takes 235 kB
(SEAL's zstd saves 10% of the 256 KiB ciphertext), 14.3x their float32 bytes; small_cnn width 32
(140k values): 8.2 MB per update, 14.7x; encrypting or decrypting it takes 0.1 s and adding three
sites' 0.25 s on one core. The public context (with relinearisation keys) is 0.7 MB, sent once.

Evaluation and the final model
------------------------------
The server cannot evaluate an encrypted model: centralised evaluation is refused (the wrapped
strategy must have no ``evaluate_fn``) and evaluation is federated (the sites decrypt the global
model in the evaluate message). A site decrypts the final global model with
:func:`decrypt_parameters`.

:func:`ckks_mod` must come first in the ClientApp's mods, so that it decrypts before and encrypts
after every other mod (clipping, ...). It works on the legacy (Client / NumPyClient) messages.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.he.planner import MAX_MODULUS_BITS
from medsec.he.wire import (
    HEInputError,
    _first_line,
    _protobuf_fields,
    _scale_text,
    _seal_object_size,
    context_bytes,
    context_parameters,
    load_public_context,
)
from medsec.protections.keys import read_private_file, write_private_file

CKKS_TENSOR_TYPE = "medsec.ckks/1"
"""``Parameters.tensor_type`` of encrypted parameters."""
HEADER_FORMAT = "medsec-ckks/1"
DTYPES = ("float16", "float32", "float64", "int32", "int64")
"""Array dtypes carried; integer arrays (BatchNorm's ``num_batches_tracked``) are rounded back."""
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 10_000
MAX_DIMS = 8
MAX_VALUES = 1 << 27
"""At most 134 million parameters per model (about 33,000 ciphertexts of 4096 slots)."""
MAX_EXAMPLES = 1 << 40
SUM_HEADROOM_BITS = 20
"""A site's weighted values stay below 2^(modulus - scale - 20) bits: room for 2^19 sites' sum."""
MAX_CONTEXT_BYTES = 64 << 20
"""Largest site context file and, decompressed, largest public context the server loads."""


@dataclass(frozen=True)
class AggregationParams:
    """CKKS parameters for additions only: ``coeff_mod_bit_sizes`` is the whole chain, special
    prime last; ``scale_bits`` the fixed-point scale of every ciphertext."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        budget = MAX_MODULUS_BITS.get(self.poly_modulus_degree)
        if budget is None:
            raise ConfigError(f"ckks.poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS)}, "
                              f"got {self.poly_modulus_degree}")
        if len(self.coeff_mod_bit_sizes) < 2 or sum(self.coeff_mod_bit_sizes) > budget:
            raise ConfigError(f"ckks.coeff_mod_bit_sizes {list(self.coeff_mod_bit_sizes)}: needs a data prime and "
                              f"the special prime, {budget} bits at most for 128-bit security at "
                              f"N={self.poly_modulus_degree}")
        if sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - SUM_HEADROOM_BITS < 20:
            raise ConfigError(f"ckks.scale_bits {self.scale_bits} leaves no room for the sum in the "
                              f"{sum(self.coeff_mod_bit_sizes[:-1])}-bit data modulus")


@dataclass(frozen=True)
class _Header:
    """What the plain header of encrypted parameters says."""

    examples: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def layout(self) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
        return self.shapes, self.dtypes

    @property
    def values(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def to_bytes(self) -> bytes:
        arrays = [{"shape": list(shape), "dtype": dtype} for shape, dtype in zip(self.shapes, self.dtypes)]
        return json.dumps({"format": HEADER_FORMAT, "examples": self.examples, "arrays": arrays},
                          separators=(",", ":")).encode()

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """``flat`` cut into the header's arrays; integer arrays are rounded."""
        out, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            part = flat[start:start + math.prod(shape)].reshape(shape)
            start += part.size
            out.append((np.rint(part) if dtype.startswith("int") else part).astype(dtype))
        return out


def _check_header(obj: Any, field: str) -> _Header:
    """A :class:`_Header` from a decoded JSON value, every field checked and bounded."""
    if not isinstance(obj, dict) or set(obj) != {"format", "examples", "arrays"}:
        raise HEInputError(field, "not a medsec CKKS header (a JSON object with 'format', 'examples', 'arrays')")
    if obj["format"] != HEADER_FORMAT:
        raise HEInputError(field, f"format must be {HEADER_FORMAT!r}, got {str(obj['format'])[:40]!r}")
    examples = obj["examples"]
    if type(examples) is not int or not 1 <= examples <= MAX_EXAMPLES:
        raise HEInputError(field, f"examples must be an integer from 1 to {MAX_EXAMPLES}, got {str(examples)[:40]}")
    arrays = obj["arrays"]
    if not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
        raise HEInputError(field, f"arrays must be a list of at most {MAX_ARRAYS} entries")
    shapes, dtypes, total = [], [], 0
    for index, entry in enumerate(arrays):
        where = f"{field} arrays[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise HEInputError(where, "must be an object with 'shape' and 'dtype'")
        shape, dtype = entry["shape"], entry["dtype"]
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or any(type(size) is not int or size < 0 for size in shape)):
            raise HEInputError(where, f"shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise HEInputError(where, f"dtype must be one of {list(DTYPES)}, got {str(dtype)[:40]!r}")
        total += math.prod(shape)
        if total > MAX_VALUES:
            raise HEInputError(where, f"more than {MAX_VALUES} values in all")
        shapes.append(tuple(shape))
        dtypes.append(dtype)
    return _Header(examples, tuple(shapes), tuple(dtypes))


def _parse_header(blob: bytes, field: str) -> _Header:
    if len(blob) > MAX_HEADER_BYTES:
        raise HEInputError(field, f"header of {len(blob)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, too long an integer
        raise HEInputError(field, "not a medsec CKKS header (not UTF-8 JSON)") from None
    return _check_header(obj, field)


def _slots(context: ts.Context) -> int:
    return context_parameters(context)["poly_modulus_degree"] // 2


def _chunk_sizes(values: int, slots: int) -> list[int]:
    return [min(slots, values - start) for start in range(0, values, slots)]


def _max_chunk_bytes(context: ts.Context) -> int:
    """A serialized chunk's bound: a two-polynomial ciphertext at the top level, plus slack for
    SEAL's and TenSEAL's headers and for compression that does not compress."""
    params = context_parameters(context)
    raw = 2 * params["poly_modulus_degree"] * (len(params["coeff_mod_bit_sizes"]) - 1) * 8
    return raw + raw // 64 + 4096


def _value_limit(context: ts.Context) -> float:
    """The largest weighted value a site may encrypt (see ``SUM_HEADROOM_BITS``)."""
    params = context_parameters(context)
    data_bits = sum(params["coeff_mod_bit_sizes"][:-1])
    return 2.0 ** (data_bits - math.log2(params["scale"]) - SUM_HEADROOM_BITS)


def _require_private(context: ts.Context, field: str) -> None:
    if not context.is_private():
        raise SecurityError(f"{field}: holds no secret key; a site needs the context of make_site_context")


def _load_vector(context: ts.Context, blob: bytes, size: int, limit: int, field: str) -> ts.CKKSVector:
    """One chunk, checked before TenSEAL parses it (at most ``limit`` bytes, compressed or not) and
    after (``size`` values, one fresh non-transparent ciphertext at the context's scale)."""
    if len(blob) > limit:
        raise HEInputError(field, f"{len(blob)} bytes, more than the {limit} a ciphertext chunk takes")
    try:
        ciphertexts = [value for number, kind, value in _protobuf_fields(blob, field) if (number, kind) == (2, 2)]
        inflated = _seal_object_size(ciphertexts[0], limit, field) if len(ciphertexts) == 1 else None
    except HEInputError:
        inflated = None
    if inflated is None:
        raise HEInputError(field, "not a serialized TenSEAL CKKS vector of one ciphertext")
    if inflated > limit:
        raise HEInputError(field, f"its ciphertext inflates to more than {limit} bytes")
    try:
        vector = ts.ckks_vector_from(context, blob)
        (ciphertext,) = vector.ciphertext()
    except Exception as err:  # noqa: BLE001 - TenSEAL/SEAL raise ValueError/RuntimeError on data that does not fit
        raise HEInputError(field, f"not a CKKS vector for this context ({_first_line(err)})") from None
    if vector.size() != size:
        raise HEInputError(field, f"{vector.size()} values, the header says {size}")
    scale = context.global_scale
    if ciphertext.scale != scale:
        raise HEInputError(field, f"scale {_scale_text(ciphertext.scale)}, the context's is {_scale_text(scale)}")
    if ciphertext.size() != 2 or ciphertext.parms_id() != context.seal_context().data.first_parms_id():
        raise HEInputError(field, "not a fresh ciphertext at the top level of the context's modulus chain")
    if ciphertext.is_transparent():
        raise HEInputError(field, "transparent (it encrypts nothing)")
    return vector


def _load_parameters(parameters: Parameters, context: ts.Context, field: str) -> tuple[_Header, list[ts.CKKSVector]]:
    """The header and checked chunks of encrypted ``parameters``; errors name ``field``."""
    if parameters.tensor_type != CKKS_TENSOR_TYPE:
        raise HEInputError(field, f"tensor_type {parameters.tensor_type[:40]!r}, not {CKKS_TENSOR_TYPE!r}: plain "
                                  "parameters (every site needs ckks_mod)")
    if not parameters.tensors:
        raise HEInputError(field, "no header")
    header = _parse_header(parameters.tensors[0], f"{field}[0]")
    slots = _slots(context)
    sizes, blobs = _chunk_sizes(header.values, slots), parameters.tensors[1:]
    if len(blobs) != len(sizes):
        raise HEInputError(field, f"{len(blobs)} ciphertext chunks, the header's {header.values} values take "
                                  f"{len(sizes)} of {slots} slots")
    limit = _max_chunk_bytes(context)
    return header, [_load_vector(context, blob, size, limit, f"{field}[{index}]")
                    for index, (blob, size) in enumerate(zip(blobs, sizes), start=1)]


def make_site_context(path: str | Path, params: AggregationParams = AggregationParams()) -> ts.Context:
    """Key ceremony: a new CKKS context with its secret key, written whole to ``path`` (a new file,
    mode 600, never overwritten) for the sites only. The server gets :func:`public_context`."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)  # only the sites encrypt
    context.global_scale = 2.0 ** params.scale_bits
    write_private_file(path, context.serialize(save_secret_key=True), "site context")
    return context


def load_site_context(path: str | Path, field: str = "federation.ckks.site_context") -> ts.Context:
    """A site's context (with the secret key) from :func:`make_site_context`'s file."""
    path = Path(path).expanduser()
    data = read_private_file(path, field, "site context", MAX_CONTEXT_BYTES,
                             "(a site makes it with make_site_context)")
    try:
        context = ts.context_from(data)
        params = context_parameters(context)
    except Exception as err:  # noqa: BLE001 - TenSEAL raises plain ValueError/RuntimeError on bad protobufs
        raise ConfigError(f"{field}: {path} is not a TenSEAL context ({_first_line(err)})") from None
    _require_private(context, f"{field}: {path}")
    if params["scheme"] != "CKKS" or params["scale"] is None:
        raise ConfigError(f"{field}: {path} is not a CKKS context with a global scale")
    return context


def public_context(site_context: ts.Context) -> bytes:
    """What the server gets: the context without its secret key."""
    return context_bytes(site_context)


def encrypt_parameters(arrays: Sequence[np.ndarray], examples: int, site_context: ts.Context) -> Parameters:
    """A site's ``arrays`` times ``examples`` (n_i), flattened and encrypted in chunks of ``slots``
    values, after the plain header."""
    _require_private(site_context, "site context")
    header = _check_header({"format": HEADER_FORMAT, "examples": examples,
                            "arrays": [{"shape": list(a.shape), "dtype": a.dtype.name} for a in arrays]}, "parameters")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] or [np.zeros(0)]) * examples
    limit = _value_limit(site_context)
    if not np.all(np.abs(flat) < limit):  # also false for NaN
        raise DataError(f"parameters: values times num_examples ({examples}) must be finite and below "
                        f"2^{math.log2(limit):g} in magnitude to add up under encryption")
    slots = _slots(site_context)
    chunks = [ts.ckks_vector(site_context, flat[start:start + slots].tolist()).serialize()
              for start in range(0, flat.size, slots)]
    return Parameters(tensors=[header.to_bytes(), *chunks], tensor_type=CKKS_TENSOR_TYPE)


def decrypt_parameters(parameters: Parameters, site_context: ts.Context,
                       field: str = "global parameters") -> list[np.ndarray]:
    """Plain arrays from encrypted ``parameters`` (a site's or the aggregate): decrypted and divided
    by the header's example count. Needs the sites' secret key."""
    _require_private(site_context, "site context")
    header, vectors = _load_parameters(parameters, site_context, field)
    flat = np.concatenate([np.asarray(vector.decrypt()) for vector in vectors] or [np.zeros(0)])
    return header.split(flat / header.examples)


class _CKKSMod:
    """See :func:`ckks_mod`. From a path, the context loads on first use and is not pickled."""

    def __init__(self, site_context: ts.Context | str | Path) -> None:
        self._path = None if isinstance(site_context, ts.Context) else Path(site_context)
        self._context = site_context if isinstance(site_context, ts.Context) else None
        if self._context is not None:
            _require_private(self._context, "ckks_mod site context")

    def __getstate__(self) -> dict:
        return {"_path": self._path, "_context": None if self._path else self._context}

    @property
    def context(self) -> ts.Context:
        if self._context is None:
            self._context = load_site_context(self._path)
        return self._context

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, ctxt)
        key = "fitins.parameters" if kind == MessageType.TRAIN else "evaluateins.parameters"
        parameters = arrayrecord_to_parameters(_array_record(msg.content, key), keep_input=True)
        if parameters.tensor_type == CKKS_TENSOR_TYPE:  # round 1's initial model comes in the clear
            arrays = decrypt_parameters(parameters, self.context)
            msg.content.array_records[key] = parameters_to_arrayrecord(ndarrays_to_parameters(arrays), False)
        out = call_next(msg, ctxt)
        if kind == MessageType.TRAIN and not out.has_error():
            plain = arrayrecord_to_parameters(_array_record(out.content, "fitres.parameters"), keep_input=True)
            examples = out.content.metric_records["fitres.num_examples"]["num_examples"]
            encrypted = encrypt_parameters(parameters_to_ndarrays(plain), examples, self.context)
            out.content.array_records["fitres.parameters"] = parameters_to_arrayrecord(encrypted, False)
        return out


def _array_record(content: RecordDict, key: str) -> Any:
    if key not in content.array_records:
        raise ConfigError(f"ckks_mod: the message has no '{key}' record; ckks_mod works with legacy "
                          "(Client / NumPyClient) ClientApps")
    return content.array_records[key]


def ckks_mod(site_context: ts.Context | str | Path) -> Mod:
    """The client mod: decrypts the global parameters of train and evaluate messages with the site's
    secret context (or the path of its file, loaded on first use) and encrypts the train reply's
    parameters, weighted by its ``num_examples``. Put it first in the ClientApp's mods."""
    return _CKKSMod(site_context)


class CKKSAggregation(Strategy):
    """Wraps a FedAvg strategy: its ``aggregate_fit`` adds the sites' encrypted, weighted
    parameters (and their example counts) with ``public_context`` (bytes of :func:`public_context`;
    one holding a secret key is refused); configuration and evaluation are the wrapped strategy's.
    Centralised evaluation is refused: the server never has the model in the clear."""

    def __init__(self, strategy: FedAvg, public_context: bytes) -> None:
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_fit is not FedAvg.aggregate_fit:
            raise ConfigError(f"federation.strategy: CKKS aggregation computes FedAvg's weighted mean; "
                              f"{type(strategy).__name__} aggregates otherwise (it needs the updates in the clear)")
        if strategy.evaluate_fn is not None:
            raise ConfigError("federation: centralised evaluation (evaluate_fn) needs the global model in the "
                              "clear, which the server never has with CKKS aggregation; evaluate on the sites")
        if not isinstance(public_context, bytes):
            raise ConfigError("CKKSAggregation takes the public context as bytes (public_context(site_context))")
        self.strategy = strategy
        self.context = load_public_context(public_context, max_inflated=MAX_CONTEXT_BYTES)  # refuses a secret key

    def __repr__(self) -> str:
        return f"CKKSAggregation({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The encrypted sum of the sites' weighted parameters, with the sum of their example counts
        in its header; a site whose ciphertexts are malformed, oversized or do not match the
        others' is refused with an error naming it."""
        if not results or (failures and not self.strategy.accept_failures):
            return None, {}
        reference: tuple[str, _Header] | None = None
        total: list[ts.CKKSVector] = []
        for proxy, res in results:
            site = f"site {proxy.cid}"
            header, vectors = _load_parameters(res.parameters, self.context, f"{site} parameters")
            if header.examples != res.num_examples:
                raise HEInputError(site, f"its header says {header.examples} examples, num_examples is "
                                         f"{res.num_examples}")
            if reference is None:
                reference, total = (proxy.cid, header), vectors
                continue
            if header.layout != reference[1].layout:
                raise HEInputError(site, f"its parameters' shapes or dtypes differ from site {reference[0]}'s")
            for accumulated, vector in zip(total, vectors):
                accumulated.add_(vector)
        examples = sum(res.num_examples for _, res in results)
        header = _Header(examples, *reference[1].layout)
        parameters = Parameters(tensors=[header.to_bytes(), *(vector.serialize() for vector in total)],
                                tensor_type=CKKS_TENSOR_TYPE)
        metrics: dict[str, Scalar] = {}
        if self.strategy.fit_metrics_aggregation_fn:
            metrics = self.strategy.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
        return parameters, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation: the server cannot evaluate an encrypted model."""
        return None
