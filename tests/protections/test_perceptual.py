"""Block-based perceptual encryption: exact inverse, each step a bijection, keys, JPEG, errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsec.errors import ConfigError, DataError
from medsec.protections import KeyRef, SecretKey
from medsec.protections.perceptual import (
    BlockScheme,
    PerceptualEncrypt,
    PerceptualEncryptd,
    PerceptualStage,
    to_blocks,
)

STEPS = ("scramble", "rotate_flip", "negative_positive", "channel_shuffle")


def only(step: str, block_size: int = 4, **kw) -> BlockScheme:
    return BlockScheme(block_size, **{s: s == step for s in STEPS}, **kw)


def noise(channels: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (channels, size, size), dtype=np.uint8)


def smooth(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / size
    return np.round(255 * (0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y)))[None].astype(np.uint8)


def symmetries(block: np.ndarray) -> list[np.ndarray]:
    turned = [np.rot90(block, k, axes=(-2, -1)) for k in range(4)]
    return turned + [t[..., ::-1] for t in turned]


@pytest.fixture(scope="module")
def key() -> SecretKey:
    return SecretKey.generate()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("block_size", [1, 4, 8])
@pytest.mark.parametrize("per_image", [False, True])
def test_decryption_inverts_encryption_exactly(key: SecretKey, channels: int, block_size: int, per_image: bool) -> None:
    cipher = PerceptualEncrypt.from_key(key, BlockScheme(block_size, per_image=per_image))
    plain = noise(channels)
    encrypted = cipher(plain, "case-1")
    assert encrypted.dtype == np.uint8 and encrypted.shape == plain.shape
    assert (encrypted != plain).mean() > 0.5
    np.testing.assert_array_equal(cipher.inverse(encrypted, "case-1"), plain)


def test_tensors_and_unit_floats_are_read_as_8_bit(key: SecretKey) -> None:
    cipher = PerceptualEncrypt.from_key(key)
    plain = noise(1)
    np.testing.assert_array_equal(cipher(torch.from_numpy(plain)), cipher(plain))
    np.testing.assert_array_equal(cipher(plain / 255.0), cipher(plain))


def test_block_scrambling_permutes_whole_blocks(key: SecretKey) -> None:
    plain = noise(1)
    encrypted = PerceptualEncrypt.from_key(key, only("scramble"))(plain)
    sort = lambda img: sorted(b.tobytes() for b in to_blocks(img, 4))
    assert sort(encrypted) == sort(plain) and not (to_blocks(encrypted, 4) == to_blocks(plain, 4)).all()


def test_rotation_flip_keeps_each_block_in_place_as_one_of_its_8_symmetries(key: SecretKey) -> None:
    plain = noise(1, size=32)
    encrypted = PerceptualEncrypt.from_key(key, only("rotate_flip"))(plain)
    used = set()
    for p, e in zip(to_blocks(plain, 4), to_blocks(encrypted, 4)):
        matches = [i for i, s in enumerate(symmetries(p)) if np.array_equal(s, e)]
        assert matches
        used.add(matches[0])
    assert len(used) == 8  # 64 blocks use all eight symmetries


def test_negative_positive_inverts_some_blocks_and_keeps_the_rest(key: SecretKey) -> None:
    plain = noise(1)
    encrypted = PerceptualEncrypt.from_key(key, only("negative_positive"))(plain)
    kinds = [("same" if np.array_equal(p, e) else "negated" if np.array_equal(255 - p, e) else "other")
             for p, e in zip(to_blocks(plain, 4), to_blocks(encrypted, 4))]
    assert "other" not in kinds and {"same", "negated"} == set(kinds)


def test_channel_shuffle_permutes_colour_channels_and_skips_grey(key: SecretKey) -> None:
    cipher = PerceptualEncrypt.from_key(key, only("channel_shuffle"))
    plain = noise(3)
    encrypted = cipher(plain)
    for p, e in zip(to_blocks(plain, 4), to_blocks(encrypted, 4)):
        assert sorted(c.tobytes() for c in p) == sorted(c.tobytes() for c in e)
    assert not np.array_equal(encrypted, plain)
    grey = noise(1)
    np.testing.assert_array_equal(cipher(grey), grey)


def test_keys_decide_the_image_and_one_key_scrambles_every_image_alike(key: SecretKey) -> None:
    scheme = only("scramble")
    block_ids = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4), np.ones((4, 4), dtype=np.uint8))[None]
    one, other = PerceptualEncrypt.from_key(key, scheme), PerceptualEncrypt.from_key(SecretKey.generate(), scheme)
    assert not np.array_equal(one(block_ids), other(block_ids))
    assert np.array_equal(one(block_ids, "a"), one(block_ids, "b"))  # the shared-key weakness
    per_image = PerceptualEncrypt.from_key(key, only("scramble", per_image=True))
    assert not np.array_equal(per_image(block_ids, "a"), per_image(block_ids, "b"))
    assert np.array_equal(per_image(block_ids, "a"), per_image(block_ids, "a"))
    # another block size derives an independent sub-key
    assert PerceptualEncrypt.from_key(key, scheme)._seed != PerceptualEncrypt.from_key(key, only("scramble", 8))._seed


def test_block_statistics_survive(key: SecretKey) -> None:
    plain = noise(3)
    encrypted = PerceptualEncrypt.from_key(key)(plain)
    stats = lambda img: sorted(np.round(to_blocks(img, 4).std(axis=(1, 2, 3)), 6))
    assert stats(encrypted) == stats(plain)
    assert np.histogram(encrypted, 256, (0, 256))[0].sum() == plain.size


def jpeg_bytes(img: np.ndarray, quality: int = 75) -> int:
    buffer = io.BytesIO()
    Image.fromarray(img[0]).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def test_encrypted_images_stay_jpeg_compressible(key: SecretKey) -> None:
    plain = smooth()
    encrypted = PerceptualEncrypt.from_key(key, BlockScheme(16))(plain)
    sizes = {"plain": jpeg_bytes(plain), "encrypted": jpeg_bytes(encrypted), "noise": jpeg_bytes(noise(1, 64))}
    assert sizes["encrypted"] < 1.15 * sizes["plain"] and sizes["encrypted"] < 0.3 * sizes["noise"], sizes


def test_dictionary_version_uses_the_record_id(key: SecretKey) -> None:
    cipher = PerceptualEncrypt.from_key(key, BlockScheme(4, per_image=True))
    record = {"image": noise(1), "label": 1, "id": "case-7"}
    encrypted = PerceptualEncryptd("image", cipher)(record)
    np.testing.assert_array_equal(encrypted["image"], cipher(record["image"], "case-7"))
    back = PerceptualEncryptd("image", cipher, decrypt=True)(encrypted)
    np.testing.assert_array_equal(back["image"], record["image"])
    assert back["label"] == 1 and back["id"] == "case-7"


@pytest.mark.parametrize(("image", "match"), [
    (np.zeros((1, 18, 16), np.uint8), r"record case-3: image size 18x16 is not divisible by crypto.block_size=4"),
    (np.zeros((1, 16, 16), np.uint16) + 300, r"record case-3: .*8-bit pixels.*uint16 in \[300, 300\]"),
    (np.full((1, 16, 16), 1.5, np.float32), r"record case-3: .*float32 in \[1.5, 1.5\]"),
    (np.zeros((1, 8, 8, 8), np.uint8), r"record case-3: .*2D image \(C, H, W\), got shape \(1, 8, 8, 8\)"),
])
def test_bad_images_are_refused_naming_the_record(key: SecretKey, image: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        PerceptualEncryptd("image", PerceptualEncrypt.from_key(key))({"image": image, "id": "case-3"})


def test_per_image_keys_need_an_id(key: SecretKey) -> None:
    with pytest.raises(DataError, match="crypto.per_image=true needs an image id"):
        PerceptualEncrypt.from_key(key, BlockScheme(per_image=True))(noise(1))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_size": 0}, "crypto.block_size must be a positive integer"),
    ({"scramble": False, "rotate_flip": False, "negative_positive": False, "channel_shuffle": False}, "every step"),
    ({"key": {"source": "passphrase"}}, "passphrase is not supported"),
])
def test_bad_configs_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PerceptualStage(**{"key": {"source": "env"}, **kwargs})


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    stage = PerceptualStage(key=KeyRef(source="file", file=str(tmp_path / "absent.key")))
    with pytest.raises(ConfigError, match=r"crypto.key.file: key file not found: .*absent.key"):
        stage.cipher()


def test_repr_shows_no_seed(key: SecretKey) -> None:
    cipher = PerceptualEncrypt.from_key(key)
    assert cipher._seed.hex() not in repr(cipher) and "block_size=4" in repr(cipher)
