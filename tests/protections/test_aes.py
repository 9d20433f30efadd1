"""AES-GCM envelopes and sealed files."""
from __future__ import annotations

import pytest

from medsec.errors import ConfigError, SecurityError
from medsec.protections.aes import cipher_for, open_sealed_bytes, seal, seal_file_bytes, unseal
from medsec.protections.keys import KeyRef, SecretKey, write_key_file


def test_envelope_round_trip_and_fresh_nonces() -> None:
    cipher = cipher_for(SecretKey.generate(), "test")
    a, b = seal(cipher, b"pixels", b"aad"), seal(cipher, b"pixels", b"aad")
    assert a != b and a[:12] != b[:12] and len(a) == 12 + len(b"pixels") + 16
    assert unseal(cipher, a, b"aad", "r") == b"pixels"


@pytest.mark.parametrize("damage", ["flip", "truncate", "aad", "key"])
def test_envelope_damage_is_detected(damage: str) -> None:
    key = SecretKey.generate()
    cipher = cipher_for(key, "test")
    envelope = bytearray(seal(cipher, b"x" * 100, b"aad"))
    aad = b"aad"
    if damage == "flip":
        envelope[40] ^= 1
    elif damage == "truncate":
        del envelope[-1]
    elif damage == "aad":
        aad = b"other place"
    else:
        cipher = cipher_for(SecretKey.generate(), "test")
    with pytest.raises(SecurityError, match="record 7 failed authentication"):
        unseal(cipher, bytes(envelope), aad, "record 7")


def test_aes_128_needs_no_more_than_a_128_bit_key() -> None:
    assert cipher_for(SecretKey(bytes(16)), "t", bits=128)
    with pytest.raises(ConfigError, match="128-bit key cannot give AES-256"):
        cipher_for(SecretKey(bytes(16)), "t", bits=256)
    with pytest.raises(ConfigError, match="crypto.bits must be 128 or 256"):
        cipher_for(SecretKey(bytes(32)), "t", bits=192)


def test_sealed_file_checks_purpose_and_key(tmp_path) -> None:
    ref = KeyRef(file=str(write_key_file(tmp_path / "a.key", SecretKey.generate())))
    other = KeyRef(file=str(write_key_file(tmp_path / "b.key", SecretKey.generate())))
    blob = seal_file_bytes(b"weights", ref, "checkpoint", name="checkpoints/best.ckpt", run_id="r1")
    assert open_sealed_bytes(blob, ref, "checkpoint", "f", name="checkpoints/best.ckpt", run_id="r1") == b"weights"
    with pytest.raises(SecurityError, match="f holds a sealed checkpoint, not a output"):
        open_sealed_bytes(blob, ref, "output", "f", name="checkpoints/best.ckpt", run_id="r1")
    with pytest.raises(SecurityError, match="f was sealed under key id .* wrong key"):
        open_sealed_bytes(blob, other, "checkpoint", "f", name="checkpoints/best.ckpt", run_id="r1")
    header_edit = blob.replace(b'"purpose": "checkpoint"', b'"purpose": "checkpoinX"')
    with pytest.raises(SecurityError, match="f failed authentication"):
        open_sealed_bytes(header_edit, ref, "checkpoinX", "f", name="checkpoints/best.ckpt", run_id="r1")


def test_sealed_file_is_bound_to_its_name_and_run(tmp_path) -> None:
    ref = KeyRef(file=str(write_key_file(tmp_path / "a.key", SecretKey.generate())))
    blob = seal_file_bytes(b"weights", ref, "checkpoint", name="checkpoints/best.ckpt", run_id="r1")
    with pytest.raises(SecurityError, match="sealed as 'checkpoints/best.ckpt' of run r1, but is opened as "
                                            "'checkpoints/last.ckpt' of run r1: it was renamed, swapped"):
        open_sealed_bytes(blob, ref, "checkpoint", "f", name="checkpoints/last.ckpt", run_id="r1")
    with pytest.raises(SecurityError, match="of run r1, but is opened as 'checkpoints/best.ckpt' of run r2"):
        open_sealed_bytes(blob, ref, "checkpoint", "f", name="checkpoints/best.ckpt", run_id="r2")
    renamed = blob.replace(b'"name": "checkpoints/best.ckpt"', b'"name": "checkpoints/last.ckpt"')
    with pytest.raises(SecurityError, match="failed authentication"):  # the binding cannot be edited
        open_sealed_bytes(renamed, ref, "checkpoint", "f", name="checkpoints/last.ckpt", run_id="r1")


def test_large_envelopes_are_sealed_in_place_and_still_checked() -> None:
    cipher = cipher_for(SecretKey.generate(), "test")
    data = bytes(range(256)) * 1024  # 256 KiB: the in-place path
    envelope = seal(cipher, data, b"aad")
    assert len(envelope) == len(data) + 28 and bytes(unseal(cipher, envelope, b"aad", "big")) == data
    envelope[100_000] ^= 1
    with pytest.raises(SecurityError, match="big failed authentication"):
        unseal(cipher, envelope, b"aad", "big")
