"""Bytes on the wire: TenSEAL contexts, SEAL ciphertexts and length-prefixed batches of them.

Everything the server reads from a client goes through here, and every failure is an
:class:`HEInputError` naming the field (``context``, ``ciphertexts[3]``) so that the server can
answer a clear 4xx.
"""
from __future__ import annotations

import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tenseal as ts
import tenseal.sealapi as sealapi

from medsec.errors import DataError, SecurityError

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


def load_public_context(data: bytes) -> ts.Context:
    """A server-side context; refuses one that holds a secret key (:class:`SecretKeyRefused`) or
    lacks the relinearisation keys the evaluation needs."""
    try:
        context = ts.context_from(data)
    except Exception as err:  # TenSEAL raises plain ValueError/RuntimeError on bad protobufs
        raise HEInputError("context", f"not a serialized TenSEAL context ({type(err).__name__})") from None
    if context.has_secret_key():
        raise SecretKeyRefused("context: holds a secret key; send the public context "
                               "(serialize(save_secret_key=False)) and keep the secret key on the client")
    if not context.has_relin_keys():
        raise HEInputError("context", "has no relinearisation keys")
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
    """Load and validate one SEAL ciphertext against ``context``: a fresh ciphertext at the top
    of its modulus chain, as the client's encryption makes it."""
    seal_context = context.seal_context().data
    try:
        ciphertext = load_ciphertext(seal_context, data)
    except Exception as err:
        raise HEInputError(field, f"not a ciphertext for the uploaded context ({err})") from None
    if ciphertext.size() != 2 or ciphertext.parms_id() != seal_context.first_parms_id():
        raise HEInputError(field, "not a fresh ciphertext at the top level of the uploaded context's modulus chain")
    return ciphertext
