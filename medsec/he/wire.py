"""Bytes on the wire: TenSEAL contexts, SEAL ciphertexts and length-prefixed batches of them.

Everything the server reads from a client goes through here, and every failure is an
:class:`HEInputError` naming the field (``context``, ``ciphertexts[3]``) so that the server can
answer a clear 4xx.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import struct
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import tenseal as ts
from tenseal import sealapi

from medsec.errors import DataError, SecurityError
from medsec.he.planner import CKKSParams

log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")
MAGIC = b"MEDSEC-HE/1\n"
"""First bytes of a packed batch."""


class HEInputError(DataError):
    """Malformed or mismatched input from a client; ``field`` names the offending part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SecretKeyRefused(SecurityError):
    """A context that carries its secret key was sent to the server."""

    field = "context"


def pack(blobs: Sequence[bytes]) -> bytes:
    """``MAGIC``, a count and length-prefixed blobs, in one buffer."""
    parts = [MAGIC, _LENGTH.pack(len(blobs))]
    for blob in blobs:
        parts += [_LENGTH.pack(len(blob)), blob]
    return b"".join(parts)


def unpack(data: bytes, field: str = "ciphertexts") -> list[bytes]:
    """The blobs of a :func:`pack` buffer; :class:`HEInputError` naming ``field`` (and the index)
    when it is truncated or not such a buffer."""
    if not data.startswith(MAGIC):
        raise HEInputError(field, f"not a medsec HE batch (expected it to start with {MAGIC!r})")
    offset = len(MAGIC)
    try:
        (count,), offset = _LENGTH.unpack_from(data, offset), offset + _LENGTH.size
        blobs = []
        for index in range(count):
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            if offset + length > len(data):
                raise HEInputError(f"{field}[{index}]", f"truncated ({len(data) - offset} of {length} bytes)")
            blobs.append(data[offset:offset + length])
            offset += length
    except struct.error:
        raise HEInputError(field, "truncated batch header") from None
    if offset != len(data):
        raise HEInputError(field, f"{len(data) - offset} unexpected bytes after the last ciphertext")
    return blobs


def context_bytes(context: ts.Context) -> bytes:
    """The public part of ``context`` (public, relinearisation and Galois keys; never the secret key)."""
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)


def context_parameters(context: ts.Context) -> dict:
    """What a context was made for: scheme, polynomial degree, the whole coefficient-modulus chain
    in bits (special prime last, as in :class:`~medsec.he.planner.CKKSParams`) and the
    global scale (``None`` when unset)."""
    parms = context.seal_context().data.key_context_data().parms()
    try:
        scale = context.global_scale
    except ValueError:  # TenSEAL: "no global scale"
        scale = None
    return {"scheme": parms.scheme().name, "poly_modulus_degree": parms.poly_modulus_degree(),
            "coeff_mod_bit_sizes": tuple(m.bit_count() for m in parms.coeff_modulus()), "scale": scale}


def _scale_text(scale: float | None) -> str:
    if scale is None:
        return "none"
    if not (scale > 0 and math.isfinite(scale)):
        return repr(scale)
    bits = math.log2(scale)
    return f"2^{bits:g}" if bits == int(bits) else f"{scale!r} (2^{bits:.6f})"


def _differences(actual: dict, expected: CKKSParams) -> list[str]:
    out = []
    if actual["poly_modulus_degree"] != expected.poly_modulus_degree:
        out.append(f"poly modulus degree N={actual['poly_modulus_degree']} (the card's is {expected.poly_modulus_degree})")
    if actual["coeff_mod_bit_sizes"] != tuple(expected.coeff_mod_bit_sizes):
        out.append(f"coefficient modulus chain {list(actual['coeff_mod_bit_sizes'])} bits (the card's is "
                   f"{list(expected.coeff_mod_bit_sizes)})")
    if actual["scale"] != 2.0 ** expected.scale_bits:
        out.append(f"scale {_scale_text(actual['scale'])} (the card's is 2^{expected.scale_bits})")
    return out


def matching_modes(context: ts.Context, expected: Mapping[str, CKKSParams]) -> tuple[str, ...]:
    """The modes of the model card whose CKKS parameters ``context`` has (N, whole modulus chain,
    scale); :class:`HEInputError` naming ``context`` and the differences when none."""
    actual = context_parameters(context)
    modes = tuple(mode for mode, params in expected.items() if not _differences(actual, params))
    if not modes:
        seen, parts = set(), []
        for mode, params in expected.items():
            if params not in seen:
                seen.add(params)
                parts.append(f"{'/'.join(m for m, p in expected.items() if p == params)}: "
                             + ", ".join(_differences(actual, params)))
        raise HEInputError("context", "its parameters differ from the model card (GET /model) for every mode; "
                                      + "; ".join(parts))
    return modes


SEAL_MAGIC = b"\x5e\xa1"
"""First bytes of a serialized SEAL object (0xA15E, little-endian); its 16-byte header then holds
the header size, version, compression mode (0 none, 1 zlib, 2 zstd) and the total size."""
_SEAL_HEADER = struct.Struct("<2sBBBBHQ")
_CHUNK = 1 << 20


class _InBuffer(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _OutBuffer(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


@functools.lru_cache(maxsize=1)
def _zstd() -> ctypes.CDLL | None:
    """libzstd's streaming decoder: the system's, or the copy linked into TenSEAL's own module."""
    candidates = [ctypes.util.find_library("zstd")]
    try:
        import _sealapi_cpp  # TenSEAL's SEAL bindings export the zstd they were built with

        candidates.append(_sealapi_cpp.__file__)
    except ImportError:
        pass
    for name in filter(None, candidates):
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_createDStream.restype = ctypes.c_void_p
            lib.ZSTD_freeDStream.argtypes = [ctypes.c_void_p]
            lib.ZSTD_initDStream.argtypes = [ctypes.c_void_p]
            lib.ZSTD_initDStream.restype = ctypes.c_size_t
            lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_OutBuffer),
                                                  ctypes.POINTER(_InBuffer)]
            lib.ZSTD_decompressStream.restype = ctypes.c_size_t
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_isError.restype = ctypes.c_uint
            return lib
        except (OSError, AttributeError):
            continue
    log.warning("no zstd library found: the decompressed size of uploaded contexts is not bounded")
    return None


def _zstd_size(data: bytes, limit: int, field: str) -> int:
    """Bytes ``data`` (zstd frames) decompresses to, counted in a fixed buffer and stopped past ``limit``."""
    lib = _zstd()
    if lib is None:
        return 0
    stream = lib.ZSTD_createDStream()
    if not stream:
        raise MemoryError("zstd")
    try:
        lib.ZSTD_initDStream(stream)
        source = ctypes.create_string_buffer(data, len(data))
        sink = ctypes.create_string_buffer(_CHUNK)
        inp = _InBuffer(ctypes.cast(source, ctypes.c_void_p), len(data), 0)
        total, frame_done = 0, False
        while True:
            out, before = _OutBuffer(ctypes.cast(sink, ctypes.c_void_p), _CHUNK, 0), inp.pos
            left = lib.ZSTD_decompressStream(stream, ctypes.byref(out), ctypes.byref(inp))
            if lib.ZSTD_isError(left) or (out.pos == 0 and inp.pos == before and inp.pos < inp.size):
                raise HEInputError(field, "corrupt zstd data in a SEAL object")
            if out.pos or inp.pos != before:
                frame_done = left == 0
            total += out.pos
            if total > limit:
                return total
            if inp.pos >= inp.size and out.pos < _CHUNK:  # all input read and all output flushed
                if not frame_done:
                    raise HEInputError(field, "truncated zstd data in a SEAL object")
                return total
    finally:
        lib.ZSTD_freeDStream(stream)


def _zlib_size(data: bytes, limit: int, field: str) -> int:
    inflate, total, rest = zlib.decompressobj(), 0, data
    try:
        while rest and total <= limit:
            total += len(inflate.decompress(rest, _CHUNK))
            rest = inflate.unconsumed_tail
    except zlib.error:
        raise HEInputError(field, "corrupt zlib data in a SEAL object") from None
    return total


def _seal_object_size(blob: bytes, limit: int, field: str) -> int:
    """The size a serialized SEAL object takes once decompressed (SEAL inflates it whole before
    parsing it), without inflating more than ``limit`` bytes."""
    if not blob:
        return 0
    if len(blob) < _SEAL_HEADER.size or blob[:2] != SEAL_MAGIC:
        raise HEInputError(field, "not a serialized SEAL object")
    _, header_size, _, _, mode, _, size = _SEAL_HEADER.unpack_from(blob)
    if header_size != _SEAL_HEADER.size or size != len(blob):
        raise HEInputError(field, "malformed SEAL object header")
    body = blob[_SEAL_HEADER.size:]
    if mode == 0:
        return len(body)
    if mode == 1:
        return _zlib_size(body, limit, field)
    if mode == 2:
        return _zstd_size(body, limit, field)
    raise HEInputError(field, f"unknown SEAL compression mode {mode}")


def _protobuf_fields(data: bytes, field: str) -> list[tuple[int, int, bytes | int]]:
    """(number, wire type, value) of each field of a protobuf message, top level only."""
    out, at = [], 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            if at >= len(data) or shift > 63:
                raise HEInputError(field, "not a serialized TenSEAL context (bad protobuf varint)")
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, varint()))
        elif wire == 2:
            length = varint()
            if at + length > len(data):
                raise HEInputError(field, "not a serialized TenSEAL context (truncated protobuf field)")
            out.append((number, wire, data[at:at + length]))
            at += length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if at + width > len(data):
                raise HEInputError(field, "not a serialized TenSEAL context (truncated protobuf field)")
            out.append((number, wire, data[at:at + width]))
            at += width
        else:
            raise HEInputError(field, f"not a serialized TenSEAL context (protobuf wire type {wire})")
    return out


def inspect_context(data: bytes, max_inflated: int, field: str = "context") -> int:
    """Check a serialized TenSEAL context before TenSEAL parses it: no secret key in it
    (:class:`SecretKeyRefused`, before the key is even loaded) and its SEAL objects (parameters,
    public, relinearisation and Galois keys) at most ``max_inflated`` bytes once decompressed,
    which is about the memory the context takes; a few zstd-compressed megabytes of zeros could
    otherwise declare Galois keys for every rotation, tens of GiB. Returns the decompressed size.
    """
    blobs: list[bytes] = []
    for number, wire, value in _protobuf_fields(data, field):
        if number == 3 and wire == 2:  # TenSEALPrivateProto: field 1 is the secret key
            if any(n == 1 and w == 2 and v for n, w, v in _protobuf_fields(value, field)):
                raise SecretKeyRefused(f"{field}: holds a secret key; send the public context "
                                       "(serialize(save_secret_key=False)) and keep the secret key on the client")
        elif number == 1 and wire == 2:  # the encryption parameters
            blobs.append(value)
        elif number == 2 and wire == 2:  # TenSEALPublicProto: public, relinearisation and Galois keys
            blobs += [v for n, w, v in _protobuf_fields(value, field) if n in (1, 4, 5) and w == 2]
    total = 0
    for blob in blobs:
        total += _seal_object_size(blob, max_inflated - total, field)
        if total > max_inflated:
            raise HEInputError(field, f"its keys take more than {max_inflated} bytes once decompressed, the "
                                      "service's limit")
    return total


def load_context(data: bytes, max_inflated: int | None = None, field: str = "context") -> ts.Context:
    """A client's public TenSEAL context, of any scheme: bounded first with ``max_inflated``
    (:func:`inspect_context`), refused when it holds a secret key (:class:`SecretKeyRefused`) or
    lacks the relinearisation keys every evaluation needs."""
    if max_inflated is not None:
        inspect_context(data, max_inflated, field)
    try:
        context = ts.context_from(data)
    except Exception as err:  # TenSEAL raises plain ValueError/RuntimeError on bad protobufs
        raise HEInputError(field, f"not a serialized TenSEAL context ({type(err).__name__})") from None
    try:
        has_secret, has_relin = context.has_secret_key(), context.has_relin_keys()
    except Exception as err:  # a context TenSEAL loaded but cannot describe
        raise HEInputError(field, f"unusable TenSEAL context ({type(err).__name__})") from None
    if has_secret:
        raise SecretKeyRefused(f"{field}: holds a secret key; send the public context "
                               "(serialize(save_secret_key=False)) and keep the secret key on the client")
    if not has_relin:
        raise HEInputError(field, "has no relinearisation keys")
    return context


def load_public_context(data: bytes, expected: Mapping[str, CKKSParams] | None = None,
                        max_inflated: int | None = None) -> ts.Context:
    """A server-side CKKS context (:func:`load_context`) with a global scale and (with
    ``expected``, the model card's parameters per mode) the parameters of one of the card's modes."""
    context = load_context(data, max_inflated)
    try:
        params = context_parameters(context)
    except Exception as err:
        raise HEInputError("context", f"unusable TenSEAL context ({type(err).__name__})") from None
    if params["scheme"] != "CKKS":  # TenSEAL's and sealapi's SCHEME_TYPE enums do not compare equal
        raise HEInputError("context", f"scheme {params['scheme']}, the model needs CKKS")
    scale = params["scale"]
    if scale is None or not math.isfinite(scale) or scale <= 1:
        raise HEInputError("context", f"global scale {_scale_text(scale)}; set context.global_scale as the "
                                      "model card says (2^scale_bits)")
    if expected is not None:
        matching_modes(context, expected)
    return context


def ciphertext_to_bytes(ciphertext: sealapi.Ciphertext) -> bytes:
    """A SEAL ciphertext's own serialisation (zstd-compressed); SEAL's Python bindings write
    files only, so it goes through a private temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ct")
        ciphertext.save(path)
        return Path(path).read_bytes()


def load_ciphertext(seal_context: sealapi.SEALContext, data: bytes) -> sealapi.Ciphertext:
    """A SEAL ciphertext from :func:`ciphertext_to_bytes` (SEAL checks it fits ``seal_context``)."""
    ciphertext = sealapi.Ciphertext()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct"
        path.write_bytes(data)
        ciphertext.load(seal_context, str(path))
    return ciphertext


def ciphertext_from_bytes(context: ts.Context, data: bytes, field: str) -> sealapi.Ciphertext:
    """Load and validate one SEAL ciphertext against ``context``: a fresh, non-transparent
    ciphertext in NTT form at the top of its modulus chain, at the context's scale, as the
    client's encryption makes it. (The context itself was checked against the model card, so
    level and scale are the card's.)"""
    seal_context = context.seal_context().data
    try:
        ciphertext = load_ciphertext(seal_context, data)
    except Exception as err:
        raise HEInputError(field, f"not a ciphertext for the uploaded context ({_first_line(err)})") from None
    if ciphertext.size() != 2 or ciphertext.parms_id() != seal_context.first_parms_id():
        raise HEInputError(field, "not a fresh ciphertext at the top level of the uploaded context's modulus chain")
    if not ciphertext.is_ntt_form():
        raise HEInputError(field, "not in NTT form, as CKKS ciphertexts are")
    if ciphertext.is_transparent():
        raise HEInputError(field, "transparent (its second component is zero: it encrypts nothing)")
    expected = context.global_scale
    if ciphertext.scale != expected:
        raise HEInputError(field, f"scale {_scale_text(ciphertext.scale)}, the context's (and model card's) is "
                                  f"{_scale_text(expected)}")
    return ciphertext


def _first_line(err: BaseException, limit: int = 160) -> str:
    """A short, single-line description of a SEAL/TenSEAL error (never the input bytes)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__
