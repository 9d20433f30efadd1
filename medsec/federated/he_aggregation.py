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
is the JSON of :mod:`medsec.federated.encrypted_sum` (shared with Paillier aggregation; bounded in
arrays and values), each chunk a serialized TenSEAL ``CKKSVector`` of
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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
from flwr.common import Parameters
from flwr.server.strategy import FedAvg

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.federated.encrypted_sum import (
    EncryptedSum,
    EncryptionMod,
    Header,
    flatten,
    header_and_payload,
    header_of,
)
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
SCHEME = "CKKS"
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


def _load_parameters(parameters: Parameters, context: ts.Context, field: str) -> tuple[Header, list[ts.CKKSVector]]:
    """The header and checked chunks of encrypted ``parameters``; errors name ``field``."""
    header, blobs = header_and_payload(parameters, CKKS_TENSOR_TYPE, HEADER_FORMAT, SCHEME, field)
    slots = _slots(context)
    sizes = _chunk_sizes(header.values, slots)
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
    header = header_of(arrays, examples, HEADER_FORMAT, SCHEME)
    flat = flatten(arrays) * examples
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
    flat = flatten([np.asarray(vector.decrypt()) for vector in vectors])
    return header.split(flat / header.examples)


class _CKKSMod(EncryptionMod):
    """See :func:`ckks_mod`."""

    name = "ckks_mod"
    tensor_type = CKKS_TENSOR_TYPE
    key_type = ts.Context

    @property
    def context(self) -> ts.Context:
        return self.key

    def check_key(self, key: ts.Context) -> None:
        _require_private(key, "ckks_mod site context")

    def load_key(self, path: Path) -> ts.Context:
        return load_site_context(path)

    def encrypt(self, arrays: list[np.ndarray], examples: int) -> Parameters:
        return encrypt_parameters(arrays, examples, self.context)

    def decrypt(self, parameters: Parameters) -> list[np.ndarray]:
        return decrypt_parameters(parameters, self.context)


def ckks_mod(site_context: ts.Context | str | Path) -> EncryptionMod:
    """The client mod: decrypts the global parameters of train and evaluate messages with the site's
    secret context (or the path of its file, loaded on first use) and encrypts the train reply's
    parameters, weighted by its ``num_examples``. Put it first in the ClientApp's mods."""
    return _CKKSMod(site_context)


class CKKSAggregation(EncryptedSum):
    """Wraps a FedAvg strategy: its ``aggregate_fit`` adds the sites' encrypted, weighted
    parameters (and their example counts) with ``public_context`` (bytes of :func:`public_context`;
    one holding a secret key is refused); configuration and evaluation are the wrapped strategy's.
    Centralised evaluation is refused: the server never has the model in the clear."""

    scheme = SCHEME

    def __init__(self, strategy: FedAvg, public_context: bytes) -> None:
        super().__init__(strategy)
        if not isinstance(public_context, bytes):
            raise ConfigError("CKKSAggregation takes the public context as bytes (public_context(site_context))")
        self.context = load_public_context(public_context, max_inflated=MAX_CONTEXT_BYTES)  # refuses a secret key

    def load(self, parameters: Parameters, field: str) -> tuple[Header, list[ts.CKKSVector]]:
        return _load_parameters(parameters, self.context, field)

    def add(self, total: list[ts.CKKSVector], other: list[ts.CKKSVector]) -> list[ts.CKKSVector]:
        for accumulated, vector in zip(total, other):
            accumulated.add_(vector)
        return total

    def parameters(self, header: Header, total: list[ts.CKKSVector]) -> Parameters:
        return Parameters(tensors=[header.to_bytes(), *(vector.serialize() for vector in total)],
                          tensor_type=CKKS_TENSOR_TYPE)
