"""AES-GCM envelopes: the primitive every AES security stage builds on, and sealed files.

An envelope is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``, with a fresh random nonce per
message and associated data that binds the envelope to where it belongs (dataset, split, record,
purpose): moving it elsewhere makes authentication fail. A *sealed file* (checkpoints, prediction
outputs) is ``MAGIC || header length || JSON header || envelope``, the header (key id, scrypt
parameters, purpose, and the file's name and run id) authenticated as associated data: a sealed
file opens only under the name and in the run it was written for, so two sealed files cannot be
swapped, renamed or moved between runs unnoticed.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsec.errors import ConfigError, SecurityError
from medsec.protections.keys import KeyRef, SecretKey, new_kdf_params

NONCE_BYTES = 12
TAG_BYTES = 16
SEALED_MAGIC = b"MEDSEC-SEALED/2\n"
SEALED_PREFIX = b"MEDSEC-SEALED/"
AES_BITS = (128, 256)
IN_PLACE_BYTES = 1 << 16
"""From this size on, envelopes are encrypted and decrypted in place (saves a copy per record)."""


def cipher_for(key: SecretKey, purpose: str, bits: int = 256) -> AESGCM:
    """An AES-GCM cipher under the HKDF sub-key of ``key`` for ``purpose``."""
    if bits not in AES_BITS:
        raise ConfigError(f"crypto.bits must be 128 or 256, got {bits}")
    if bits > key.bits:
        raise ConfigError(f"a {key.bits}-bit key cannot give AES-{bits}; use a 256-bit key")
    return AESGCM(key.derive(f"aes-gcm/{purpose}", bits // 8))


def seal(cipher: AESGCM, plaintext: bytes, aad: bytes) -> bytes | bytearray:
    """Encrypt and authenticate ``plaintext`` under a fresh random nonce. Large buffers are
    encrypted in place into the envelope (no copy of the ciphertext)."""
    nonce = os.urandom(NONCE_BYTES)
    if len(plaintext) < IN_PLACE_BYTES:
        return nonce + cipher.encrypt(nonce, plaintext, aad)
    envelope = bytearray(NONCE_BYTES + len(plaintext) + TAG_BYTES)
    envelope[:NONCE_BYTES] = nonce
    cipher.encrypt_into(nonce, plaintext, aad, memoryview(envelope)[NONCE_BYTES:])
    return envelope


def unseal(cipher: AESGCM, envelope: bytes | bytearray, aad: bytes, what: str) -> bytes | bytearray:
    """Decrypt an envelope; any tampering, truncation, wrong key or wrong ``aad`` raises a
    :class:`SecurityError` naming ``what``."""
    if len(envelope) < NONCE_BYTES + TAG_BYTES:
        raise SecurityError(f"{what} is truncated ({len(envelope)} bytes, shorter than an AES-GCM envelope)")
    view = memoryview(envelope)
    try:
        if len(envelope) < IN_PLACE_BYTES:
            return cipher.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], aad)
        plaintext = bytearray(len(envelope) - NONCE_BYTES - TAG_BYTES)
        cipher.decrypt_into(view[:NONCE_BYTES], view[NONCE_BYTES:], aad, plaintext)
        return plaintext
    except InvalidTag:
        raise SecurityError(f"{what} failed authentication: it was modified, truncated, moved from "
                            "another place, or the key is wrong") from None


def is_sealed(data: bytes | str | Path) -> bool:
    """Whether ``data`` (bytes or a file) is a sealed file (of any format version)."""
    if isinstance(data, (str, Path)):
        with open(data, "rb") as handle:
            data = handle.read(len(SEALED_PREFIX))
    return data.startswith(SEALED_PREFIX)


def seal_file_bytes(plaintext: bytes, key_ref: KeyRef, purpose: str, bits: int = 256,
                    key: SecretKey | None = None, *, name: str, run_id: str | None = None) -> bytes:
    """Seal ``plaintext`` for ``purpose`` (``checkpoint``, ``output``) as a self-describing file,
    bound to its ``name`` (its path within its run) and the ``run_id`` of the run it belongs to."""
    kdf = new_kdf_params() if key_ref.needs_kdf else None
    key = key if key is not None and kdf is None else key_ref.load(kdf)
    header = json.dumps({"key_id": key.key_id, "kdf": kdf, "purpose": purpose, "bits": bits, "name": name,
                         "run": run_id}, sort_keys=True).encode()
    prefix = SEALED_MAGIC + struct.pack(">I", len(header)) + header
    return prefix + seal(cipher_for(key, f"sealed/{purpose}", bits), plaintext, prefix)


HEADER_TYPES = {"key_id": str, "purpose": str, "bits": int, "name": str, "run": (str, type(None)),
                "kdf": (dict, type(None))}
MAX_HEADER_BYTES = 4096


def read_sealed_header(blob: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Split a sealed file into (header, authenticated prefix, envelope); a damaged or unknown
    header raises a :class:`SecurityError` naming ``what`` and the field."""
    if not blob.startswith(SEALED_PREFIX):
        raise SecurityError(f"{what} is not a medsec sealed file")
    if not blob.startswith(SEALED_MAGIC):
        raise SecurityError(f"{what} was sealed by an older medsec (format {blob[len(SEALED_PREFIX):][:8]!r}), "
                            "whose files are not bound to their name and run; seal it again with this version")
    start = len(SEALED_MAGIC) + 4
    if len(blob) < start:
        raise SecurityError(f"{what} has a damaged header (truncated length field)")
    (length,) = struct.unpack(">I", blob[len(SEALED_MAGIC):start])
    if length > MAX_HEADER_BYTES or len(blob) < start + length:
        raise SecurityError(f"{what} has a damaged header (length {length})")
    try:
        header = json.loads(blob[start:start + length])
    except ValueError:
        raise SecurityError(f"{what} has a damaged header (not JSON)") from None
    if not isinstance(header, dict):
        raise SecurityError(f"{what} has a damaged header (not a JSON object)")
    for field, kind in HEADER_TYPES.items():
        if field not in header or not isinstance(header[field], kind) or isinstance(header[field], bool):
            raise SecurityError(f"{what} has a damaged header (field '{field}' missing or of the wrong type)")
    if header["bits"] not in AES_BITS:
        raise SecurityError(f"{what} has a damaged header (field 'bits' is {header['bits']})")
    return header, blob[:start + length], blob[start + length:]


def open_sealed_bytes(blob: bytes, key_ref: KeyRef, purpose: str, what: str, *, name: str,
                      run_id: str | None = None) -> bytes | bytearray:
    """Open a sealed file written by :func:`seal_file_bytes` for the same ``purpose``, ``name`` and
    ``run_id``; anything else raises a :class:`SecurityError` naming ``what``."""
    header, prefix, envelope = read_sealed_header(blob, what)
    if header["purpose"] != purpose:
        raise SecurityError(f"{what} holds a sealed {header['purpose']}, not a {purpose}")
    key = key_ref.load(header["kdf"])
    if key.key_id != header["key_id"]:
        raise SecurityError(f"{what} was sealed under key id {header['key_id']}, but {key_ref.describe()} "
                            f"has key id {key.key_id}: wrong key")
    plaintext = unseal(cipher_for(key, f"sealed/{purpose}", header["bits"]), envelope, prefix, what)
    if (header["name"], header["run"]) != (name, run_id):
        raise SecurityError(f"{what} was sealed as '{header['name']}' of run {header['run']}, but is opened as "
                            f"'{name}' of run {run_id}: it was renamed, swapped or moved from another run")
    return plaintext
