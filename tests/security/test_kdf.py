"""Key derivation against untrusted inputs: HKDF sub-keys bound to their length, scrypt parameters
from unauthenticated headers bounded before use, and the transmission packet header (its ``kdf``
field, the receiver's key cache, and random corruption).
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec.errors import ConfigError, DataError, MedsecError, SecurityError
from medsec.protections import keys
from medsec.protections.keys import (
    KeyRef,
    SecretKey,
    check_kdf_params,
    new_kdf_params,
    passphrase_key,
    write_key_file,
)
from medsec.protections.transmission import MAGIC, SecureChannel, read_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: no thread pool

MATERIAL = bytes(range(1, 33))
PASSPHRASE = "correct horse battery staple"


# ---- HKDF ----------------------------------------------------------------------------------------
def test_sub_keys_of_different_lengths_are_not_prefix_related() -> None:
    key = SecretKey(MATERIAL)
    for purpose in ("aes-gcm/records", "aes-gcm/sealed/checkpoint", "key-id", "x"):
        by_length = {length: key.derive(purpose, length) for length in (8, 16, 24, 32, 64)}
        for short, short_key in by_length.items():
            for long, long_key in by_length.items():
                if short < long:
                    assert long_key[:short] != short_key, (purpose, short, long)
        assert key.derive(purpose, 16) == key.derive(purpose, 16)


def test_hkdf_info_names_the_version_purpose_and_length() -> None:
    key = SecretKey(MATERIAL)
    for purpose, length in (("aes-gcm/records", 16), ("aes-gcm/records", 32), ("key-id", 8)):
        expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                        info=f"medsec/v2/{purpose}/{8 * length}-bit".encode()).derive(MATERIAL)
        assert key.derive(purpose, length) == expected
    assert key.key_id == key.derive("key-id", 8).hex()


def test_aes128_and_aes256_keys_for_one_purpose_are_unrelated() -> None:
    from medsec.protections.aes import cipher_for  # the AES sub-keys the stores and sealed files use

    key = SecretKey(MATERIAL)
    assert key.derive("aes-gcm/records", 32)[:16] != key.derive("aes-gcm/records", 16)
    nonce = bytes(12)
    assert cipher_for(key, "records", 128).encrypt(nonce, b"x", b"") != \
        cipher_for(key, "records", 256).encrypt(nonce, b"x", b"")


# ---- scrypt parameters ---------------------------------------------------------------------------
def good(**changes: Any) -> dict[str, Any]:
    return {"name": "scrypt", "salt": "00112233445566778899aabbccddeeff", "n": 2**15, "r": 8, "p": 1} | changes


BAD_PARAMS = [
    (good(p=256), "'p'"),                       # 45 s per derivation
    (good(p=2), "'p'"),
    (good(p=0), "'p'"),
    (good(n=2**24), "'n'"),                     # a 16 GiB allocation
    (good(n=2**19), "'n'"),                     # above the bound (512 MiB, about 1.5 s)
    (good(n=2**14), "'n'"),                     # weaker than any file medsec wrote
    (good(n=2**10), "'n'"),
    (good(n=2**17 + 1), "'n'"),                 # not a power of two
    (good(n=3 * 2**15), "'n'"),
    (good(n=-(2**17)), "'n'"),
    (good(n=10**400), "'n'"),                   # too many digits for str()
    (good(r=1000), "'r'"),
    (good(r=1), "'r'"),
    (good(salt="00112233445566778899aabbccddee"), "'salt'"),      # 15 bytes
    (good(salt="00112233445566778899aabbccddeeff00"), "'salt'"),  # 17 bytes
    (good(salt=""), "'salt'"),
    (good(salt="0011223344556677 8899aabbccddeeff"[:32]), "'salt'"),  # whitespace, fromhex would skip it
    (good(salt="zz112233445566778899aabbccddeeff"), "'salt'"),
    (good(salt=12345), "'salt'"),
    (good(salt=None), "'salt'"),
    (good(salt=["00"] * 16), "'salt'"),
    (good(n="131072"), "'n'"),
    (good(n=131072.0), "'n'"),
    (good(n=True), "'n'"),
    (good(p=True), "'p'"),                      # bool is an int in Python, and True == 1
    (good(r=8.0), "'r'"),
    (good(n=[2**15]), "'n'"),
    (good(n=None), "'n'"),
    (good(name="argon2"), "'name'"),
    (good(name=None), "'name'"),
    (good(maxmem=2**40), "'maxmem'"),           # an extra field
    (good(length=64), "'length'"),
    ({k: v for k, v in good().items() if k != "salt"}, "'salt'"),
    ({k: v for k, v in good().items() if k != "n"}, "'n'"),
    ({k: v for k, v in good().items() if k != "r"}, "'r'"),
    ({k: v for k, v in good().items() if k != "p"}, "'p'"),
    ({k: v for k, v in good().items() if k != "name"}, "'name'"),
    ([1, 2, 3], "not a JSON object"),
    ("scrypt", "not a JSON object"),
    (42, "not a JSON object"),
]


@pytest.fixture
def no_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused parameters must be refused before scrypt runs."""
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("scrypt ran with unchecked parameters")

    monkeypatch.setattr(keys, "Scrypt", fail)


@pytest.mark.parametrize("kdf, field", BAD_PARAMS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_PARAMS)])
def test_unsafe_scrypt_parameters_are_refused_before_use(kdf: Any, field: str, no_scrypt: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    with pytest.raises(SecurityError, match=f"store /s manifest field 'kdf'.*{field}") as err:
        passphrase_key(PASSPHRASE, kdf, where="store /s manifest field 'kdf'")
    assert isinstance(err.value, ConfigError)  # both: callers may catch either
    assert PASSPHRASE not in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(SecurityError, match=field):
        check_kdf_params(kdf)
    monkeypatch.setenv("SEC_TEST_PASS", PASSPHRASE)
    with pytest.raises(SecurityError, match=f"'kdf'.*{field}"):
        KeyRef(source="passphrase", passphrase_env="SEC_TEST_PASS").load(kdf)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("n", [2**15, 2**16, 2**17, 2**18])
def test_parameters_of_old_and_new_files_are_accepted(n: int) -> None:
    assert check_kdf_params(good(n=n)) == good(n=n)
    assert check_kdf_params(good(salt="00112233445566778899AABBCCDDEEFF")) is not None


def test_new_files_use_n_2_to_the_17() -> None:
    kdf = new_kdf_params()
    assert kdf["name"] == "scrypt" and kdf["n"] == 2**17 and kdf["r"] == 8 and kdf["p"] == 1
    assert len(bytes.fromhex(kdf["salt"])) == 16 and kdf["salt"] != new_kdf_params()["salt"]
    assert check_kdf_params(kdf) == kdf


def test_passphrase_key_at_the_new_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    kdf = new_kdf_params()
    start = time.perf_counter()
    key = passphrase_key(PASSPHRASE, kdf)
    elapsed = time.perf_counter() - start
    assert key == passphrase_key(PASSPHRASE, dict(kdf)) and key.bits == 256
    assert key != passphrase_key(PASSPHRASE, kdf | {"n": 2**15})
    assert elapsed < 5, f"one scrypt derivation at n=2^17 took {elapsed:.2f} s"


@pytest.mark.parametrize("failure", [MemoryError(), ValueError("Not enough memory"), OverflowError()])
def test_a_failing_derivation_is_one_clear_error(failure: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def derive(self, data: bytes) -> bytes:
            raise failure

    monkeypatch.setattr(keys, "Scrypt", Failing)
    with pytest.raises(SecurityError, match=r"sealed file x.bin: scrypt could not derive the key \(n=2\^15, r=8, p=1") \
            as err:
        passphrase_key(PASSPHRASE, good(), where="sealed file x.bin")
    assert PASSPHRASE not in str(err.value) and err.value.__cause__ is None


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(ConfigError, match="passphrase is empty"):
        passphrase_key("", good())


# ---- transmission packets ------------------------------------------------------------------------
def make_model() -> torch.nn.Module:
    from medsec.models.codec import HyperpriorCodec  # imports CompressAI: seconds

    torch.manual_seed(0)
    return HyperpriorCodec(N=4, M=6).eval()


IMAGE = torch.rand(1, 12, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A cheap stand-in for scrypt (tests of the cache would otherwise spend 0.3 s per salt); it
    records the parameters of each derivation."""
    calls: list[dict[str, Any]] = []

    class Fast:
        def __init__(self, *, salt: bytes, length: int, n: int, r: int, p: int) -> None:
            self.params = {"salt": salt, "length": length, "n": n, "r": r, "p": p}

        def derive(self, data: bytes) -> bytes:
            calls.append(self.params)
            return hashlib.sha256(repr(self.params).encode() + data).digest()[:self.params["length"]]

    monkeypatch.setattr(keys, "Scrypt", Fast)
    return calls


def with_header(packet: bytes, change) -> bytes:
    """``packet`` with its JSON header edited by ``change`` (framing kept consistent)."""
    header, _, envelope = read_header(packet)
    header = change(header) or header
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + envelope


def test_key_cache_is_bounded(model: torch.nn.Module, fast_scrypt: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEC_CAE_PASS", PASSPHRASE)
    ref = {"source": "passphrase", "passphrase_env": "SEC_CAE_PASS"}
    sender, receiver = SecureChannel(model, ref), SecureChannel(model, ref)
    packets = []
    for i in range(100):
        sender.kdf = new_kdf_params()  # a new salt per packet, as 100 senders would have
        packets.append(sender.send(IMAGE, f"img-{i}"))
    salts = {read_header(p)[0]["kdf"]["salt"] for p in packets}
    assert len(salts) == 100
    for i, packet in enumerate(packets):
        assert receiver.receive(packet, f"img-{i}").shape == IMAGE.shape
        assert len(receiver._keys) <= 8
    assert len(receiver._keys) == 8
    derived = len(fast_scrypt)
    receiver.receive(packets[-1], "img-99")  # a recent salt: from the cache
    assert len(fast_scrypt) == derived
    receiver.receive(packets[0], "img-0")  # evicted long ago: derived again
    assert len(fast_scrypt) == derived + 1 and len(receiver._keys) == 8


def test_cache_entries_are_per_parameter_set_not_per_salt(model: torch.nn.Module, fast_scrypt: list,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEC_CAE_PASS", PASSPHRASE)
    ref = {"source": "passphrase", "passphrase_env": "SEC_CAE_PASS"}
    sender, receiver = SecureChannel(model, ref), SecureChannel(model, ref)
    packet = sender.send(IMAGE, "a")
    receiver.receive(packet, "a")
    cheaper = with_header(packet, lambda h: h["kdf"].update(n=2**15))  # same salt, other cost
    with pytest.raises(SecurityError, match="wrong key|failed authentication"):
        receiver.receive(cheaper, "a")
    assert [call["n"] for call in fast_scrypt[-2:]] == [2**17, 2**15]


@pytest.mark.parametrize("change, field", [
    (lambda h: h["kdf"].update(p=256), "'p'"),
    (lambda h: h["kdf"].update(n=2**24), "'n'"),
    (lambda h: h["kdf"].update(r=1000), "'r'"),
    (lambda h: h["kdf"].update(salt="00"), "'salt'"),
    (lambda h: h["kdf"].update(n="big"), "'n'"),
    (lambda h: h.update(kdf=[1, 2]), "not a JSON object"),
    (lambda h: h.update(kdf="scrypt"), "not a JSON object"),
])
def test_packet_with_unsafe_scrypt_parameters_is_refused_fast(model: torch.nn.Module, change, field: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEC_CAE_PASS", PASSPHRASE)
    ref = {"source": "passphrase", "passphrase_env": "SEC_CAE_PASS"}
    sender = SecureChannel(model, ref)
    sender.kdf = new_kdf_params() | {"n": 2**15}
    packet = with_header(sender.send(IMAGE, "img-1"), change)
    receiver = SecureChannel(model, ref)
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"packet for image 'img-1': header field 'kdf'.*{field}"):
        receiver.receive(packet, "img-1")
    assert time.perf_counter() - start < 0.5 and not receiver._keys


@pytest.mark.parametrize("field, value", [
    ("bits", "256"), ("bits", 192), ("bits", None), ("format", True), ("format", 2), ("image_shape", [1, -36, 44]),
    ("image_shape", "1x36x44"), ("image_shape", [1, 36]), ("image_shape", [1, 9.0, 11]), ("z_bytes", 10**400),
    ("model", 7), ("key_id", "KEY"), ("key_id", None), ("envelope_bytes", "x"), ("envelope_bytes", -1),
])
def test_header_fields_are_checked_before_any_key_is_derived(channels: list, field: str, value: Any) -> None:
    channel, packet = channels[1]  # the passphrase channel: a key would be derived from the header
    bad = with_header(packet, lambda h: h.update({field: value}))
    with pytest.raises(DataError, match=f"packet for image 'img': header field '{field}"):
        channel.receive(bad, "img")


# ---- fuzzing the packet header -------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=10)
FIELDS = ("format", "image_shape", "model", "coder", "key_id", "bits", "kdf", "z_bytes", "envelope_bytes")


@pytest.fixture
def channels(model: torch.nn.Module, tmp_path: Path, fast_scrypt: list,
             monkeypatch: pytest.MonkeyPatch) -> list[tuple[SecureChannel, bytes]]:
    """A key-file channel and a passphrase channel (cheap scrypt), each with one good packet."""
    monkeypatch.setenv("SEC_CAE_PASS", PASSPHRASE)
    pairs = []
    for ref in (KeyRef(file=str(write_key_file(tmp_path / "k.key", SecretKey.generate()))),
                KeyRef(source="passphrase", passphrase_env="SEC_CAE_PASS")):
        channel = SecureChannel(model, ref)
        pairs.append((channel, channel.send(IMAGE, "img")))
    return pairs


def corrupt(packet: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "length", "field", "header"]))
    if kind == "truncate":
        return packet[:data.draw(st.integers(0, len(packet) - 1))]
    if kind == "flip":
        out = bytearray(packet)
        for _ in range(data.draw(st.integers(1, 4))):
            out[data.draw(st.integers(0, len(out) - 1))] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    if kind == "insert":
        at = data.draw(st.integers(0, len(packet)))
        return packet[:at] + data.draw(st.binary(min_size=1, max_size=16)) + packet[at:]
    if kind == "length":
        return MAGIC + struct.pack(">I", data.draw(st.integers(0, 2**32 - 1))) + packet[len(MAGIC) + 4:]
    start = len(MAGIC) + 4
    (length,) = struct.unpack(">I", packet[len(MAGIC):start])
    header = json.loads(packet[start:start + length])
    if kind == "field":
        header[data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        text = json.dumps(header).encode()
    else:
        text = data.draw(st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()),
                                   st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
                                   st.integers(1, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d)))
    return MAGIC + struct.pack(">I", len(text)) + text + packet[start + length:]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_packets_raise_only_medsec_errors(channels: list, data: st.DataObject) -> None:
    for channel, good_packet in channels:
        packet = corrupt(good_packet, data)
        for step, argument in ((read_header, "packet for image 'img'"), (channel.receive, "img")):
            try:
                step(packet, argument)
            except MedsecError as err:
                assert str(err) and len(str(err)) < 2000
            # any other exception fails the test


@settings(max_examples=100, deadline=None)
@given(kdf=JSON | st.fixed_dictionaries({"name": st.just("scrypt"), "salt": st.text(max_size=40) | JSON,
                                         "n": st.integers() | JSON, "r": st.integers() | JSON,
                                         "p": st.integers() | JSON}))
def test_random_kdf_fields_are_refused_or_bounded(kdf: Any) -> None:
    try:
        checked = check_kdf_params(kdf)
    except MedsecError:
        return
    assert checked["r"] == 8 and checked["p"] == 1 and 2**15 <= checked["n"] <= 2**18
