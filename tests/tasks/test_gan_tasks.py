"""DeepKeyGen and EncipherGAN: training, checkpoints, keys, the cipher interface, the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsec.analysis.ciphers.learned import DeepKeyGenCipher, EncipherGANCipher
from medsec.errors import ConfigError, SecurityError
from medsec.protections import KeyRef, SecretKey
from medsec.protections.key_images import load_key, save_key
from medsec.protections.keys import write_key_file
from medsec.tasks.deepkeygen import DeepKeyGenTask, combine, separate
from tests.conftest import read_metrics, run_verb


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)


def test_training_logs_the_cipher_metrics(gan_runs: dict[str, Path]) -> None:
    """One epoch on 16 images: each metric in its range (the key generator already spreads its keys
    over most grey levels and changes nearly every pixel for another secret; the EncipherGAN's
    decryptor has not learned yet, so its PSNR is only bounded, not compared)."""
    keygen, encipher = read_metrics(gan_runs["deepkeygen"]), read_metrics(gan_runs["encipher_gan"])
    for split in ("val", "test"):
        assert 5.0 < keygen[f"{split}/key_entropy"] <= 8.0  # bits per pixel; an ideal key: 8
        assert 90.0 < keygen[f"{split}/key_npcr"] <= 100.0  # % pixels changed by another secret; ideal 99.6
        assert 5.0 < keygen[f"{split}/cipher_entropy"] <= 8.0
        assert abs(keygen[f"{split}/cipher_correlation"]) < 0.2  # adjacent cipher pixels; ideal 0
        assert 0.0 < encipher[f"{split}/cipher_entropy"] <= 8.0
        assert 3.0 < encipher[f"{split}/psnr"] < 60.0  # dB
        assert 3.0 < encipher[f"{split}/wrong_key_psnr"] < 60.0
        assert -1.0 <= encipher[f"{split}/ssim"] <= 1.0
    assert keygen["val/key_entropy_best"] == keygen["val/key_entropy"]  # one epoch: the best is the only one
    assert encipher["val/psnr_best"] == encipher["val/psnr"]
    for metrics, losses in ((keygen, ("d_loss", "g_adversarial", "g_diversity")),
                            (encipher, ("d_loss", "g_adversarial", "g_cycle"))):
        assert all(0.0 <= metrics[f"train/{name}"] < 50.0 for name in losses), metrics  # finite, non-negative
    assert 0.0 <= encipher["train/g_ssim"] <= 2.0  # 1 - SSIM
    assert (gan_runs["encipher_gan"] / "checkpoints" / "best.ckpt").is_file()


def test_deepkeygen_keys_are_reproducible_and_secret_sensitive(gan_runs: dict[str, Path]) -> None:
    cipher = DeepKeyGenCipher.from_checkpoint(gan_runs["deepkeygen"] / "checkpoints" / "best.ckpt")
    secret = cipher.keygen()
    key = cipher.task.generate_key(secret, (32, 32))
    assert key.dtype == np.uint8 and key.shape == (32, 32)
    assert np.array_equal(key, cipher.task.generate_key(secret, (32, 32)))
    assert not np.array_equal(key, cipher.task.generate_key(cipher.flip_key_bit(secret, 200), (32, 32)))
    reloaded = DeepKeyGenTask.load_from_checkpoint(gan_runs["deepkeygen"] / "checkpoints" / "best.ckpt")
    assert reloaded.weights_digest() == cipher.task.weights_digest()
    assert np.array_equal(reloaded.generate_key(secret, (32, 32)), key)


def test_deepkeygen_keys_are_stored_sealed(gan_runs: dict[str, Path], tmp_path: Path) -> None:
    task = DeepKeyGenTask.load_from_checkpoint(gan_runs["deepkeygen"] / "checkpoints" / "best.ckpt")
    key = task.generate_key(bytes(32), (32, 32))
    ref = KeyRef(source="file", file=str(write_key_file(tmp_path / "k.key", SecretKey.generate())))
    path = save_key(tmp_path / "key.sealed", key, task.weights_digest(), ref)
    assert key.tobytes() not in path.read_bytes()
    loaded, digest = load_key(path, ref)
    assert np.array_equal(loaded, key) and digest == task.weights_digest()
    other = KeyRef(source="file", file=str(write_key_file(tmp_path / "other.key", SecretKey.generate())))
    with pytest.raises(SecurityError, match="wrong key"):
        load_key(path, other)


@pytest.mark.parametrize("mode", ["xor", "add"])
def test_key_diffusion_round_trips(mode: str, images: np.ndarray) -> None:
    key = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    assert np.array_equal(separate(combine(images, key, mode), key, mode), images)


def test_learned_ciphers_keep_the_image_size(gan_runs: dict[str, Path], images: np.ndarray) -> None:
    for cls in (DeepKeyGenCipher, EncipherGANCipher):
        cipher = cls.from_checkpoint(gan_runs[cls.name] / "checkpoints" / "best.ckpt")
        key = cipher.keygen()
        ct = cipher.encrypt(images, key)
        assert ct.images.shape == images.shape and ct.images.dtype == np.uint8
        decrypted = cipher.decrypt(ct, key)
        assert decrypted.shape == images.shape and decrypted.dtype == np.uint8
        assert cipher.lossless == np.array_equal(decrypted, images)


def test_report_names_what_a_learned_cipher_fails(gan_runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = gan_runs["deepkeygen"] / "checkpoints" / "best.ckpt"
    result = run_verb("report", ["cipher=deepkeygen", f"ckpt_path={ckpt}", "num_images=8",
                                 "nist_sequences=4"], tmp_path)
    assert result["image_shape"] == [32, 32]  # the checkpoint's data set
    # one changed pixel changes one cipher pixel under a fixed key image: the differential test must fail
    assert "plaintext_npcr" in result["failed"] and "plaintext_npcr" in result["summary"]
    assert result["tests"]["decryption_psnr"]["exact"]


def test_training_crops_and_bad_settings(gan_runs: dict[str, Path]) -> None:
    ckpt = gan_runs["deepkeygen"] / "checkpoints" / "best.ckpt"
    task = DeepKeyGenTask.load_from_checkpoint(ckpt, crop_size=16)
    assert task.crop(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 16, 16)
    model = dict(task.hparams.model)
    with pytest.raises(ConfigError, match="task.mode"):
        DeepKeyGenTask(model=model, optimizer=task.hparams.optimizer, mode="rot13")
    with pytest.raises(ConfigError, match="spatial_dims"):
        DeepKeyGenTask(model=model, optimizer=task.hparams.optimizer, spatial_dims=3)
