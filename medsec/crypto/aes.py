"""AES-GCM envelopes: the primitive every AES security stage builds on, and sealed files.

An envelope is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``, with a fresh random nonce per
message and associated data that binds the envelope to where it belongs (dataset, split, record,
purpose): moving it elsewhere makes authentication fail. A *sealed file* (checkpoints, prediction
outputs) is ``MAGIC || header length || JSON header || envelope``, the header (key id, scrypt
parameters, purpose) authenticated as associated data.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsec.crypto.keys import KeyRef, SecretKey, new_kdf_params
from medsec.errors import ConfigError, SecurityError

NONCE_BYTES = 12
TAG_BYTES = 16
SEALED_MAGIC = b"MEDSEC-SEALED/1\n"
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
    """Whether ``data`` (bytes or a file) is a sealed file."""
    if isinstance(data, (str, Path)):
        with open(data, "rb") as handle:
            data = handle.read(len(SEALED_MAGIC))
    return data.startswith(SEALED_MAGIC)


def seal_file_bytes(plaintext: bytes, key_ref: KeyRef, purpose: str, bits: int = 256,
                    key: SecretKey | None = None) -> bytes:
    """Seal ``plaintext`` for ``purpose`` (``checkpoint``, ``output``) as a self-describing file."""
    kdf = new_kdf_params() if key_ref.needs_kdf else None
    key = key if key is not None and kdf is None else key_ref.load(kdf)
    header = json.dumps({"key_id": key.key_id, "kdf": kdf, "purpose": purpose, "bits": bits},
                        sort_keys=True).encode()
    prefix = SEALED_MAGIC + struct.pack(">I", len(header)) + header
    return prefix + seal(cipher_for(key, f"sealed/{purpose}", bits), plaintext, prefix)


def read_sealed_header(blob: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Split a sealed file into (header, authenticated prefix, envelope)."""
    if not blob.startswith(SEALED_MAGIC):
        raise SecurityError(f"{what} is not a medsec sealed file")
    start = len(SEALED_MAGIC) + 4
    try:
        (length,) = struct.unpack(">I", blob[len(SEALED_MAGIC):start])
        header = json.loads(blob[start:start + length])
    except (struct.error, ValueError) as err:
        raise SecurityError(f"{what} has a damaged header ({err})") from None
    if not isinstance(header, Mapping) or not {"key_id", "purpose", "bits"} <= set(header):
        raise SecurityError(f"{what} has a damaged header")
    return dict(header), blob[:start + length], blob[start + length:]


def open_sealed_bytes(blob: bytes, key_ref: KeyRef, purpose: str, what: str) -> bytes:
    """Open a sealed file written by :func:`seal_file_bytes` for the same ``purpose``."""
    header, prefix, envelope = read_sealed_header(blob, what)
    if header["purpose"] != purpose:
        raise SecurityError(f"{what} holds a sealed {header['purpose']}, not a {purpose}")
    key = key_ref.load(header.get("kdf"))
    if key.key_id != header["key_id"]:
        raise SecurityError(f"{what} was sealed under key id {header['key_id']}, but {key_ref.describe()} "
                            f"has key id {key.key_id}: wrong key")
    return unseal(cipher_for(key, f"sealed/{purpose}", int(header["bits"])), envelope, prefix, what)
