"""Learned ciphers: trained GAN tasks (:mod:`medsec.tasks.deepkeygen`, :mod:`medsec.tasks.encipher_gan`)
behind the :class:`~medsec.analysis.ciphers.classical.ImageCipher` interface, so ``medsec report``
judges them exactly as it judges AES and the chaotic cipher."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from medsec.analysis.ciphers.classical import Ciphertext, ImageCipher
from medsec.errors import ConfigError
from medsec.tasks.deepkeygen import DeepKeyGenTask, combine, separate
from medsec.tasks.encipher_gan import EncipherGANTask
from medsec.tasks.gan import GANTask, cipher_levels, from_cipher_levels, plain_levels


class LearnedCipher(ImageCipher):
    """A trained GAN task behind the :class:`ImageCipher` interface (inference only, CPU)."""

    task_class: ClassVar[type[GANTask]]

    def __init__(self, task: GANTask) -> None:
        self.task = task.eval().cpu()

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path | None) -> LearnedCipher:
        """Load the task from a ``medsec train`` checkpoint (``ckpt_path=...``)."""
        if not ckpt_path:
            raise ConfigError(f"ckpt_path: cipher={cls.name} needs a trained checkpoint (ckpt_path=PATH)")
        from medsec.core.checkpoint import build_task, read_checkpoint

        payload = read_checkpoint(ckpt_path)
        return cls(build_task(payload, f"ckpt_path: {ckpt_path}", expect=cls.task_class))


class DeepKeyGenCipher(LearnedCipher):
    """DeepKeyGen as an :class:`ImageCipher`: the key (a secret seed) makes a key image, which is
    XORed (or added) to every image."""

    name = "deepkeygen"
    task_class = DeepKeyGenTask
    task: DeepKeyGenTask

    def encrypt(self, images: np.ndarray, key: bytes, nonces: list[bytes] | None = None) -> Ciphertext:
        key_image = self.task.generate_key(self.check_key(key), images.shape[1:])
        return Ciphertext(combine(images, key_image, self.task.hparams.mode))

    def decrypt(self, ciphertext: Ciphertext, key: bytes) -> np.ndarray:
        key_image = self.task.generate_key(self.check_key(key), ciphertext.images.shape[1:])
        return separate(ciphertext.images, key_image, self.task.hparams.mode)


class EncipherGANCipher(LearnedCipher):
    """EncipherGAN as an :class:`ImageCipher`: the key's noise map keys both generators. Lossy:
    decryption approximates the plain image."""

    name = "encipher_gan"
    task_class = EncipherGANTask
    task: EncipherGANTask
    lossless = False
    batch_size = 16
    """Images per forward pass."""

    def _run(self, network: nn.Module, images: torch.Tensor, key: bytes) -> torch.Tensor:
        with torch.no_grad():
            return network(images, self.task.key_maps(images, [self.check_key(key)] * len(images)))

    def _batches(self, images: np.ndarray) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), self.batch_size):
            yield torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))[:, None]

    def encrypt(self, images: np.ndarray, key: bytes, nonces: list[bytes] | None = None) -> Ciphertext:
        parts = [cipher_levels(self._run(self.task.encryptor, b.float() / 255, key)) for b in self._batches(images)]
        return Ciphertext(torch.cat(parts)[:, 0].numpy())

    def decrypt(self, ciphertext: Ciphertext, key: bytes) -> np.ndarray:
        parts = [plain_levels(self._run(self.task.decryptor, from_cipher_levels(b), key))
                 for b in self._batches(ciphertext.images)]
        return torch.cat(parts)[:, 0].numpy()
