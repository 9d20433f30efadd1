"""DeepKeyGen and EncipherGAN: training, checkpoints, keys, the cipher interface, the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from medsec.crypto import KeyRef, SecretKey
from medsec.crypto.keys import write_key_file
from medsec.errors import ConfigError, SecurityError
from medsec.report import report
from medsec.tasks.deepkeygen import DeepKeyGenCipher, DeepKeyGenTask, combine, load_key, save_key, separate
from medsec.tasks.encipher_gan import EncipherGANCipher
from medsec.utils.config import compose_config
from tests.conftest import read_metrics, run_verb

TINY_GAN = ["data.source.num_samples=[16,8,8]", "data.source.image_size=32", "data.batch_size=8",
            "data.num_workers=0", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny training run per GAN task, on synthetic images."""
    runs = {}
    for name in ("deepkeygen", "encipher_gan"):
        runs[name] = tmp_path_factory.mktemp(name)
        run_verb("train", [f"experiment={name}_synthetic", *TINY_GAN], runs[name])
    return runs


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)


def test_training_logs_the_cipher_metrics(trained: dict[str, Path]) -> None:
    keygen, encipher = read_metrics(trained["deepkeygen"]), read_metrics(trained["encipher_gan"])
    for key in ("val/key_entropy", "val/key_npcr", "test/cipher_entropy", "train/d_loss", "train/g_diversity"):
        assert keygen[key] is not None, key
    assert 0 < keygen["test/key_entropy"] <= 8
    for key in ("val/psnr", "val/ssim", "test/psnr", "test/wrong_key_psnr", "train/g_cycle", "train/g_ssim"):
        assert encipher[key] is not None, key
    assert (trained["encipher_gan"] / "checkpoints" / "best.ckpt").is_file()


def test_deepkeygen_keys_are_reproducible_and_secret_sensitive(trained: dict[str, Path]) -> None:
    cipher = DeepKeyGenCipher.from_checkpoint(trained["deepkeygen"] / "checkpoints" / "best.ckpt")
    secret = cipher.keygen()
    key = cipher.task.generate_key(secret, (32, 32))
    assert key.dtype == np.uint8 and key.shape == (32, 32)
    assert np.array_equal(key, cipher.task.generate_key(secret, (32, 32)))
    assert not np.array_equal(key, cipher.task.generate_key(cipher.flip_key_bit(secret, 200), (32, 32)))
    reloaded = DeepKeyGenTask.load_from_checkpoint(trained["deepkeygen"] / "checkpoints" / "best.ckpt")
    assert reloaded.weights_digest() == cipher.task.weights_digest()
    assert np.array_equal(reloaded.generate_key(secret, (32, 32)), key)


def test_deepkeygen_keys_are_stored_sealed(trained: dict[str, Path], tmp_path: Path) -> None:
    task = DeepKeyGenTask.load_from_checkpoint(trained["deepkeygen"] / "checkpoints" / "best.ckpt")
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


def test_learned_ciphers_keep_the_image_size(trained: dict[str, Path], images: np.ndarray) -> None:
    for cls in (DeepKeyGenCipher, EncipherGANCipher):
        cipher = cls.from_checkpoint(trained[cls.name] / "checkpoints" / "best.ckpt")
        key = cipher.keygen()
        ct = cipher.encrypt(images, key)
        assert ct.images.shape == images.shape and ct.images.dtype == np.uint8
        decrypted = cipher.decrypt(ct, key)
        assert decrypted.shape == images.shape and decrypted.dtype == np.uint8
        assert cipher.lossless == np.array_equal(decrypted, images)


def test_report_names_what_a_learned_cipher_fails(trained: dict[str, Path], tmp_path: Path) -> None:
    ckpt = trained["deepkeygen"] / "checkpoints" / "best.ckpt"
    cfg = compose_config("report", ["cipher=deepkeygen", f"ckpt_path={ckpt}", "num_images=8", "nist_sequences=4"],
                         output_dir=tmp_path)
    try:
        result = report(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert result["image_shape"] == [32, 32]  # the checkpoint's data set
    # one changed pixel changes one cipher pixel under a fixed key image: the differential test must fail
    assert "plaintext_npcr" in result["failed"] and "plaintext_npcr" in result["summary"]
    assert result["tests"]["decryption_psnr"]["exact"]


def test_training_crops_and_bad_settings(trained: dict[str, Path]) -> None:
    task = DeepKeyGenTask.load_from_checkpoint(trained["deepkeygen"] / "checkpoints" / "best.ckpt", crop_size=16)
    assert task.crop(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 16, 16)
    model = dict(task.hparams.model)
    with pytest.raises(ConfigError, match="task.mode"):
        DeepKeyGenTask(model=model, optimizer=task.hparams.optimizer, mode="rot13")
    with pytest.raises(ConfigError, match="spatial_dims"):
        DeepKeyGenTask(model=model, optimizer=task.hparams.optimizer, spatial_dims=3)
