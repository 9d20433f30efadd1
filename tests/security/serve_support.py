"""Shared pieces of the `medsec serve` security tests: the tiny program's clients and contexts,
a real uvicorn server in a background thread (loopback, free port), a throwaway TLS CA, and the
SEAL forgeries of :mod:`medsec.he.testing` (skipped without libzstd)."""
from __future__ import annotations

import datetime
import functools
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from fastapi import FastAPI

from medsec.he import HEClient, ModelCard
from medsec.he import testing as forge
from medsec.he.testing import free_port, seal_object  # noqa: F401  (seal_object: for the tests)
from tests.he.tiny import tiny

PRECISION = 12
T = TypeVar("T")


def card() -> ModelCard:
    return tiny()[1].card(PRECISION)


@functools.cache
def he_client(mode: str) -> HEClient:
    """One client per mode for the whole session (a latency context takes about 2 s, 80 MB)."""
    return HEClient(card(), mode)


@functools.cache
def public_context(mode: str) -> bytes:
    return he_client(mode).public_context()


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


def _skip_without_zstd(forgery: Callable[..., T]) -> Callable[..., T]:
    """``forgery`` from :mod:`medsec.he.testing`, skipping the test where libzstd is missing."""

    @functools.wraps(forgery)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return forgery(*args, **kwargs)
        except forge.ZstdMissing as err:
            pytest.skip(str(err))

    return wrapper


uncompressed = _skip_without_zstd(forge.uncompressed)
transparent = _skip_without_zstd(forge.transparent)
bomb_context = _skip_without_zstd(forge.bomb_context)
