"""Paillier encrypted-input inference of a linear head (medsec.he.paillier): exact to the stated
fixed-point bound, malformed input refused naming the field and index, no key material anywhere the
server or the logs can show it. 1024-bit keys for speed; the 2048-bit cost is the slow test."""
from __future__ import annotations

import logging
import pickle
import time

import numpy as np
import pytest
import torch
from phe import PaillierPrivateKey

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.he.paillier import (
    BATCH_MAGIC,
    FINGERPRINT_BYTES,
    KEY_MAGIC,
    PaillierClient,
    PaillierLinear,
    ciphertexts_to_bytes,
    encode,
    encrypted_probe,
    generate_keypair,
    linear_error_bound,
    load_public_key,
    pack,
    paillier_probe,
    public_key_bytes,
    unpack,
    uses_gmpy2,
)
from medsec.he.wire import HEInputError
from medsec.models import he_cnn, small_cnn

FEATURES, CLASSES = 12, 5
HEAD = len(BATCH_MAGIC) + FINGERPRINT_BYTES + 4


@pytest.fixture(scope="module")
def pair() -> dict:
    """A client (1024-bit key), a server holding a random 5 x 12 head, and one encrypted request."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(0, 1, (CLASSES, FEATURES)), rng.normal(0, 1, CLASSES)
    client = PaillierClient(1024)
    server = PaillierLinear(weight, bias, client.public_key)
    x = rng.normal(0, 3, FEATURES)
    return {"client": client, "server": server, "weight": weight, "bias": bias, "x": x,
            "request": client.encrypt(x, server.card)}


def _secrets(client: PaillierClient) -> list[str]:
    """Texts that would show key material: p, q, n, lambda in decimal, and the start of each in hex."""
    private = client._private
    values = (private.p, private.q, private.public_key.n, (private.p - 1) * (private.q - 1))
    return [str(v) for v in values] + [hex(v)[2:18] for v in values]


def test_encrypted_logits_equal_plain_within_the_stated_bound(pair: dict) -> None:
    rng = np.random.default_rng(1)
    client, server = pair["client"], pair["server"]
    for scale in (0.01, 1.0, 1000.0):
        x = rng.normal(0, scale, FEATURES)
        logits = client.decrypt(server.evaluate(client.encrypt(x, server.card)), server.card)
        exact = pair["weight"] @ x + pair["bias"]
        bound = linear_error_bound(pair["weight"], pair["bias"], x[None], server.card.frac_bits)[0]
        assert np.all(np.abs(logits - exact) <= bound), (logits - exact, bound)
        assert bound.max() < 1e-4 * max(scale, 1)


def test_logits_pack_across_ciphertexts_and_frac_bits_trade_precision() -> None:
    rng = np.random.default_rng(2)
    client = PaillierClient(1024)
    weight, bias, x = rng.normal(0, 1, (40, 6)), rng.normal(0, 1, 40), rng.normal(0, 1, 6)
    for frac_bits in (8, 24, 40):
        server = PaillierLinear(weight, bias, client.public_key, frac_bits)
        answer = server.evaluate(client.encrypt(x, server.card))
        assert server.card.ciphertexts > 1 and len(answer) == HEAD + server.card.ciphertexts * 256
        error = np.abs(client.decrypt(answer, server.card) - (weight @ x + bias))
        assert np.all(error <= linear_error_bound(weight, bias, x[None], frac_bits)[0])
    with pytest.raises(ConfigError, match="frac_bits"):
        PaillierLinear(weight, bias, client.public_key, 60)


def test_probe_of_a_classifier_matches_its_plain_head() -> None:
    torch.manual_seed(0)
    net = he_cnn(3, image_size=16, kernel_size=5, hidden=(8,))
    images = torch.rand(3, 1, 16, 16)
    logits, report = paillier_probe(net, images, key_bits=1024)
    with torch.no_grad():
        plain = net.eval()(images).double().numpy()
    assert logits.shape == (3, 3) and report["within_bound"] and report["gmpy2"]
    assert report["max_abs_error"] <= report["max_error_bound"] < 1e-5
    assert np.abs(logits - plain).max() < 1e-5  # float32 rounding of the plain head on top
    assert report["request_bytes_per_image"] == HEAD + 8 * 256 and report["response_bytes_per_image"] == HEAD + 256
    with pytest.raises(ConfigError, match="Linear head"):
        encrypted_probe(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1024)


def test_fixed_point_and_packing_round_trip() -> None:
    rng = np.random.default_rng(3)
    digits = [0, 2**40 - 1, -(2**40) + 1] + [int(d) for d in rng.integers(-(2**40), 2**40, 30)]
    assert unpack(pack(digits, 42), len(digits), 42, "x") == digits
    with pytest.raises(DataError, match="x: the decrypted value overflows"):
        unpack(pack(digits, 42), len(digits) - 1, 42, "x")
    assert encode(np.array([1.5, -0.25, 2.0**-30]), 2, "v") == [6, -1, 0]
    with pytest.raises(DataError, match=r"features\[1\]: must be finite and below 2\^20"):
        encode(np.array([0.0, 2.0**20]), 8, "features")
    with pytest.raises(DataError, match=r"features\[2\]: must be finite"):
        encode(np.array([0.0, 1.0, np.nan]), 8, "features")


def _replace(request: bytes, index: int, value: int) -> bytes:
    start = HEAD + index * 256
    return request[:start] + value.to_bytes(256, "big") + request[start + 256:]


def _cases(pair: dict) -> dict:
    key, request, other = pair["server"].public_key, pair["request"], generate_keypair(1024)[0]
    values = [int.from_bytes(request[at:at + 256], "big") for at in range(HEAD, len(request), 256)]
    return {
        "not an integer": ([*values[:2], 1.5, *values[3:]], r"features\[2\]: not an integer \(float\)"),
        "a string": ([*values[:4], "12", *values[5:]], r"features\[4\]: not an integer \(str\)"),
        "zero": (_replace(request, 3, 0), r"features\[3\]: outside \[1, n\^2\)"),
        "n^2": ([*values[:5], key.nsquare, *values[6:]], r"features\[5\]: outside \[1, n\^2\)"),
        "huge": ([*values[:1], 10**2000, *values[2:]], r"features\[1\]: outside \[1, n\^2\)"),
        "not coprime": (_replace(request, 7, key.n * 3), r"features\[7\]: not coprime to the modulus"),
        "too few": (values[:-1], r"features: 11 ciphertexts, expected 12"),
        "too many (list)": ([*values, values[0]], r"features: 13 ciphertexts, expected 12"),
        "declared count": (ciphertexts_to_bytes(key, values[:-1]), r"features: 11 ciphertexts, expected 12"),
        "truncated": (request[:-10], r"features: truncated"),
        "oversized": (request + bytes(300), r"features: \d+ bytes, more than the \d+ that 12"),
        "other key": (ciphertexts_to_bytes(other, [other.raw_encrypt(1)] * FEATURES),
                      r"features: encrypted under another public key"),
        "wider key": (ciphertexts_to_bytes(generate_keypair(2048)[0], values),
                      r"features: \d+ bytes, more than the \d+ that 12"),
        "garbage": (b"\x00" * 100, r"features: not a medsec Paillier batch"),
        "wrong type": ({"features": values}, r"features: must be a batch of ciphertexts"),
    }


def test_malformed_requests_are_refused_naming_field_and_index(pair: dict) -> None:
    secrets = _secrets(pair["client"])
    for case, (request, message) in _cases(pair).items():
        with pytest.raises(HEInputError, match=message) as caught:
            pair["server"].evaluate(request)
        assert caught.value.field.startswith("features"), case
        assert not any(s in str(caught.value) for s in secrets), case


def test_malformed_public_keys_and_key_sizes_are_refused() -> None:
    for data, message in [(b"junk", "not a medsec Paillier public key"),
                          (KEY_MAGIC + bytes(64), "a modulus of 64 bytes"),
                          (KEY_MAGIC + b"\xff" * 127 + b"\xfe", "must be odd"),
                          (KEY_MAGIC + b"\x00" + b"\xff" * 127, "at least 1024 bits"),
                          ("text", "must be the bytes")]:
        with pytest.raises(HEInputError, match=message):
            load_public_key(data)
    for bits in (512, 8192, 2048.0, True):
        with pytest.raises(ConfigError, match="paillier.key_bits must be an integer from 1024 to 4096"):
            PaillierClient(bits)


def test_server_has_no_private_key(pair: dict) -> None:
    server, client = pair["server"], pair["client"]
    assert not any(isinstance(v, PaillierPrivateKey) for v in vars(server).values())
    assert not any(hasattr(server.public_key, name) for name in ("p", "q", "hp", "hq"))
    state = pickle.dumps(server)
    assert hex(client._private.p)[2:].encode() not in state and str(client._private.p).encode() not in state
    with pytest.raises(SecurityError, match="private key stays with the client"):
        PaillierLinear(pair["weight"], pair["bias"], client._private)
    with pytest.raises(SecurityError, match="never leaves"):
        public_key_bytes(client._private)
    answer = server.evaluate(pair["request"])  # what the server could read: ciphertexts only
    assert client.decrypt(answer, server.card).shape == (CLASSES,)


def test_keys_stay_out_of_reprs_and_logs(pair: dict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    torch.manual_seed(0)
    _, report = paillier_probe(small_cnn(2, 1, 2, 4), torch.rand(1, 1, 16, 16), key_bits=1024)
    client, server = pair["client"], pair["server"]
    texts = [repr(client), str(client), repr(server), str(server), repr(server.card), str(report), caplog.text]
    assert repr(client) == "PaillierClient(1024-bit key)" and "5x12" in repr(server)
    assert not any(secret in text for secret in _secrets(client) for text in texts)


def test_python_paillier_runs_on_gmpy2() -> None:
    assert uses_gmpy2()


@pytest.mark.slow
def test_cost_of_64_images_with_2048_bit_keys() -> None:
    """ms per image and bytes per image of the he_cnn (32 features, 10 classes; 64 images) and
    small_cnn (width 32: 128 features; 16 images) heads under 2048-bit keys."""
    torch.manual_seed(0)
    for name, net, count in [("he_cnn", he_cnn(10), 64), ("small_cnn", small_cnn(10), 16)]:
        start = time.perf_counter()
        _, report = paillier_probe(net, torch.rand(count, 1, 28, 28), key_bits=2048)
        print(f"\n{name}: {report['features']} features -> {report['classes']} logits, {count} images in "
              f"{time.perf_counter() - start:.1f} s: encrypt {report['encrypt_ms_per_image']:.0f} ms, server "
              f"{report['server_ms_per_image']:.0f} ms, decrypt {report['decrypt_ms_per_image']:.1f} ms per image; "
              f"{report['request_bytes_per_image']:.0f} B up, {report['response_bytes_per_image']:.0f} B down; "
              f"max error {report['max_abs_error']:.1e} (bound {report['max_error_bound']:.1e})")
        assert report["within_bound"]
