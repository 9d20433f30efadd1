"""The classical image ciphers: exact round trips, keys, nonces and the common interface."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.analysis.ciphers.classical import AESCTRCipher, ChaoticCipher, Ciphertext, ImageCipher
from medsec.analysis.ciphers.statistics import npcr
from medsec.errors import ConfigError

CIPHERS = [AESCTRCipher(), AESCTRCipher(bits=128), ChaoticCipher(), ChaoticCipher(rounds=3)]


@pytest.fixture
def images() -> np.ndarray:
    ramp = np.add.outer(np.arange(24), np.arange(20)).astype(np.uint8)
    return np.stack([ramp, ramp[::-1], np.zeros_like(ramp)])


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: f"{c.name}-{c.key_bytes * 8}")
def test_round_trip_is_exact_and_keeps_the_shape(cipher: ImageCipher, images: np.ndarray) -> None:
    key = cipher.keygen()
    ct = cipher.encrypt(images, key)
    assert ct.images.shape == images.shape and ct.images.dtype == np.uint8
    assert npcr(images, ct.images).mean() > 90
    assert np.array_equal(cipher.decrypt(ct, key), images)
    assert not np.array_equal(cipher.decrypt(ct, cipher.flip_key_bit(key, 7)), images)


def test_flip_key_bit_changes_exactly_one_bit() -> None:
    key = bytes(32)
    flipped = ImageCipher.flip_key_bit(key, 9)
    assert flipped[1] == 2 and sum(bin(b).count("1") for b in flipped) == 1
    assert ImageCipher.flip_key_bit(flipped, 9) == key
    with pytest.raises(ValueError, match="outside"):
        ImageCipher.flip_key_bit(key, 256)


def test_aes_ctr_uses_fresh_nonces_unless_given(images: np.ndarray) -> None:
    cipher = AESCTRCipher()
    key = cipher.keygen()
    first, second = cipher.encrypt(images, key), cipher.encrypt(images, key)
    assert len(set(first.nonces)) == len(images) and first.nonces != second.nonces
    assert not np.array_equal(first.images, second.images)
    again = cipher.encrypt(images, key, first.nonces)
    assert np.array_equal(again.images, first.images)


def test_aes_ctr_with_a_reused_nonce_changes_only_the_changed_pixel(images: np.ndarray) -> None:
    """Why the report gives nonce-based ciphers fresh nonces: a stream cipher does not diffuse."""
    cipher = AESCTRCipher()
    key = cipher.keygen()
    ct = cipher.encrypt(images, key)
    changed = images.copy()
    changed[:, 3, 4] ^= 1
    assert np.all(npcr(ct.images, cipher.encrypt(changed, key, ct.nonces).images) == pytest.approx(100 / images[0].size))


def test_chaotic_cipher_is_deterministic_and_diffuses_one_pixel(images: np.ndarray) -> None:
    cipher = ChaoticCipher()
    key = cipher.keygen()
    ct = cipher.encrypt(images, key)
    assert ct.nonces is None and np.array_equal(ct.images, cipher.encrypt(images, key).images)
    changed = images.copy()
    changed[:, 3, 4] ^= 1
    assert npcr(ct.images, cipher.encrypt(changed, key).images).min() > 98


def test_bad_keys_and_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        ChaoticCipher().encrypt(np.zeros((1, 4, 4), np.uint8), b"short")
    with pytest.raises(ConfigError, match="cipher.r"):
        ChaoticCipher(r=2.5)
    with pytest.raises(ConfigError, match="cipher.bits"):
        AESCTRCipher(bits=192)
    with pytest.raises(ConfigError, match="nonces"):
        AESCTRCipher().decrypt(Ciphertext(np.zeros((1, 4, 4), np.uint8)), bytes(32))
