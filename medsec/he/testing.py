"""Test doubles for the homomorphic service: a tiny compiled program, and hand-made SEAL objects
(uncompressed copies, forged ciphertexts, decompression bombs) that a hostile client could send.

Used by the service's security tests (``tests/security``) and by ``scripts/loadtest_serve.py``;
nothing in medsec itself calls them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

import torch

from medsec.he import HEClient, HEProgram, compile_model
from medsec.he.wire import _protobuf_fields, ciphertext_to_bytes, load_ciphertext
from medsec.models import he_cnn

TINY_SHAPE = (1, 8, 8)
SEAL_HEADER = 16
"""Bytes of SEAL's serialization header: magic 0xA15E, header size, version, compression mode,
reserved, total size."""


class ZstdMissing(RuntimeError):
    """No libzstd on this machine to rewrite SEAL objects uncompressed."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for a service under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=1)
def tiny_program() -> tuple[torch.nn.Module, HEProgram, torch.Tensor]:
    """A tiny he_cnn (8x8 images, conv 2x2x2 stride 2 -> square -> 32->4 -> square -> 4->2), its
    compiled program and 8 images in [0, 1]: (net, program, images), built once per process."""
    torch.manual_seed(0)
    net = he_cnn(2, image_size=8, channels=2, kernel_size=2, stride=2, hidden=[4]).eval()
    images = torch.rand(8, *TINY_SHAPE)
    return net, compile_model(net, torch.rand(32, *TINY_SHAPE)), images


@functools.lru_cache(maxsize=1)
def _zstd() -> ctypes.CDLL:
    name = ctypes.util.find_library("zstd")
    if name is None:
        raise ZstdMissing("no libzstd to rewrite SEAL objects uncompressed")
    lib = ctypes.CDLL(name)
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


def uncompressed(blob: bytes, capacity: int = 64 << 20) -> tuple[bytes, bytes]:
    """A zstd-compressed SEAL object as (header, members): the same object, uncompressed, is
    ``seal_object(header, members)``. Raises :class:`ZstdMissing` without libzstd."""
    if blob[:2] != b"\x5e\xa1" or blob[5] != 2:
        raise ValueError("not a zstd-compressed SEAL object")
    lib = _zstd()
    out = ctypes.create_string_buffer(capacity)
    body = blob[SEAL_HEADER:]
    size = lib.ZSTD_decompress(out, capacity, body, len(body))
    if lib.ZSTD_isError(size):
        raise ValueError("zstd could not decompress the SEAL object")
    return blob[:SEAL_HEADER], out.raw[:size]


def seal_object(header: bytes, members: bytes) -> bytes:
    """A SEAL object with compression mode none (SEAL loads those as readily as compressed ones)."""
    return header[:5] + b"\x00" + header[6:8] + struct.pack("<Q", SEAL_HEADER + len(members)) + members


def transparent(client: HEClient, blob: bytes) -> bytes:
    """``blob`` (a ciphertext of ``client``'s) with its second component zeroed: SEAL calls that
    "transparent" (it decrypts without the key) and refuses to compute on it. Rewritten uncompressed:
    the second component is the last N x L words."""
    header, members = uncompressed(blob)
    words = client.params.poly_modulus_degree * (len(client.params.coeff_mod_bit_sizes) - 1)
    return seal_object(header, members[:-8 * words] + bytes(8 * words))


def rescaled(client: HEClient, blob: bytes, scale: float = 2.0 ** 45) -> bytes:
    """``blob`` claiming another ``scale`` (SEAL would fail on it mid-evaluation)."""
    ciphertext = load_ciphertext(client.context.seal_context().data, blob)
    ciphertext.scale = scale
    return ciphertext_to_bytes(ciphertext)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def zstd_frame(parts: list[bytes | int]) -> bytes:
    """A zstd frame by hand: ``bytes`` parts as raw blocks, ``int`` parts as that many zero bytes in
    RLE blocks of up to 128 KiB (4 bytes each on the wire)."""
    blocks: list[tuple[int, bytes, int]] = []  # (type, content, size)
    for part in parts:
        if isinstance(part, int):
            while part:
                size = min(part, 128 << 10)
                blocks.append((1, b"\x00", size))
                part -= size
        else:
            for at in range(0, len(part), 128 << 10):
                chunk = part[at:at + (128 << 10)]
                blocks.append((0, chunk, len(chunk)))
    frame = bytearray(b"\x28\xb5\x2f\xfd\x00" + bytes([7 << 3]))  # magic, no content size, 128 KiB window
    for i, (kind, content, size) in enumerate(blocks):
        frame += ((i == len(blocks) - 1) | kind << 1 | size << 3).to_bytes(3, "little") + content
    return bytes(frame)


def bomb_relin_keys(relin: bytes, entries: int) -> bytes:
    """Relinearisation keys (a zstd SEAL object) rewritten to declare ``entries`` key sets of zero
    coefficients: each set is SEAL-valid data that SEAL allocates as it reads (about 5.5 MB at
    N=8192), and costs under 1 KB on the wire. ``entries=8192`` declares about 45 GB."""
    header, members = uncompressed(relin)
    parms_id, (dim2,) = members[:32], struct.unpack_from("<Q", members, 40)
    key = members[48:48 + (len(members) - 48) // dim2]
    (size,) = struct.unpack_from("<Q", key, 8)  # the public key's own SEAL header: its total size
    data = size - 113  # the coefficients: everything after 113 bytes of headers and metadata
    meta = key[:size - data]
    parts: list[bytes | int] = [parms_id + struct.pack("<Q", entries)]
    for _ in range(entries):
        parts.append(struct.pack("<Q", dim2))
        for _ in range(dim2):
            parts += [meta, data]
    frame = zstd_frame(parts)
    return header[:8] + struct.pack("<Q", SEAL_HEADER + len(frame)) + frame


def bomb_context(context: bytes, entries: int) -> bytes:
    """``context`` (a serialized public TenSEAL context) with its relinearisation keys replaced by
    :func:`bomb_relin_keys` (a few MB on the wire for thousands of entries)."""

    def field(number: int, value: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(value)) + value

    def encode(fields: Iterable[tuple[int, int, Any]], replace: Callable[[int, bytes], bytes]) -> bytes:
        out = bytearray()
        for number, wire, value in fields:
            if wire == 2:
                out += field(number, replace(number, value))
            elif wire == 0:
                out += varint(number << 3) + varint(value)
            else:
                out += varint(number << 3 | wire) + value
        return bytes(out)

    def public(number: int, value: bytes) -> bytes:
        return bomb_relin_keys(value, entries) if number == 4 else value

    def top(number: int, value: bytes) -> bytes:
        return encode(_protobuf_fields(value, "context"), public) if number == 2 else value

    return encode(_protobuf_fields(context, "context"), top)
