"""Shared pieces of the `medsec serve` security tests: the tiny program's clients and contexts,
a real uvicorn server in a background thread (loopback, free port) and a throwaway TLS CA."""
from __future__ import annotations

import datetime
import functools
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from medsec.crypto.he import HEClient, ModelCard
from tests.crypto.he.tiny import tiny

PRECISION = 12


def card() -> ModelCard:
    return tiny()[1].card(PRECISION)


@functools.lru_cache(maxsize=None)
def he_client(mode: str) -> HEClient:
    """One client per mode for the whole session (a latency context takes about 2 s, 80 MB)."""
    return HEClient(card(), mode)


@functools.lru_cache(maxsize=None)
def public_context(mode: str) -> bytes:
    return he_client(mode).public_context()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: FastAPI, **config) -> Iterator[int]:
    """``app`` served by uvicorn on 127.0.0.1 in a background thread; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_tls(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1, ::1 and localhost, plus a
    second, unrelated CA; PEM files in ``directory`` (the key readable by its owner only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def ca(label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(label)).issuer_name(name(label))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("medsec test CA")
    _, other_cert = ca("another CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "other_ca": directory / "other_ca.pem", "cert": directory / "server.pem",
             "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["other_ca"].write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def token_file(path: Path, *tokens: str, mode: int = 0o600) -> Path:
    path.write_text("".join(f"{t}\n" for t in tokens))
    path.chmod(mode)
    return path


SEAL_HEADER = 16
"""Bytes of SEAL's serialization header: magic 0xA15E, header size, version, compression mode,
reserved, total size."""


def _zstd():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("zstd")
    if name is None:
        import pytest

        pytest.skip("no libzstd to rewrite SEAL objects uncompressed")
    lib = ctypes.CDLL(name)
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


def uncompressed(blob: bytes, capacity: int = 64 << 20) -> tuple[bytes, bytes]:
    """A zstd-compressed SEAL object as (header, members): the same object, uncompressed, is
    ``seal_object(header, members)``."""
    import ctypes

    assert blob[:2] == b"\x5e\xa1" and blob[5] == 2, "not a zstd-compressed SEAL object"
    lib = _zstd()
    out = ctypes.create_string_buffer(capacity)
    body = blob[SEAL_HEADER:]
    size = lib.ZSTD_decompress(out, capacity, body, len(body))
    assert not lib.ZSTD_isError(size), "zstd could not decompress the SEAL object"
    return blob[:SEAL_HEADER], out.raw[:size]


def seal_object(header: bytes, members: bytes) -> bytes:
    """A SEAL object with compression mode none (SEAL loads those as readily as compressed ones)."""
    import struct

    return header[:5] + b"\x00" + header[6:8] + struct.pack("<Q", SEAL_HEADER + len(members)) + members


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
    frame = bytearray(b"\x28\xb5\x2f\xfd" + b"\x00" + bytes([7 << 3]))  # magic, no content size, 128 KiB window
    for i, (kind, content, size) in enumerate(blocks):
        frame += ((i == len(blocks) - 1) | kind << 1 | size << 3).to_bytes(3, "little") + content
    return bytes(frame)


def bomb_relin_keys(relin: bytes, entries: int) -> bytes:
    """Relinearisation keys (a zstd SEAL object) rewritten to declare ``entries`` key sets of zero
    coefficients: each set is SEAL-valid data that SEAL allocates as it reads (about 5.5 MB at
    N=8192), and costs under 1 KB on the wire. ``entries=8192`` declares about 45 GB."""
    import struct

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
    from medsec.crypto.he.wire import _protobuf_fields

    def field(number: int, value: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(value)) + value

    def encode(fields, replace) -> bytes:
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
