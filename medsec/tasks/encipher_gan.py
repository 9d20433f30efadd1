"""EncipherGAN (after Panwar et al., Systems 2023): learned encryption, CycleGAN-style.

An encryption generator ``E(x, k)`` turns an image into a cipher image of the same size and a
decryption generator ``D(c, k)`` turns it back, both keyed by a secret key's noise map. Two patch
critics push cipher images towards the cipher domain (uniform noise) and decrypted images towards
real images; cycle (L1) and SSIM losses make ``D(E(x, k), k)`` reproduce ``x``. Cipher images are
rounded to 8 bits in training (straight-through), as they are when stored. The cipher built on a
trained task is :class:`medsec.analysis.ciphers.learned.EncipherGANCipher`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medsec.analysis.ciphers.statistics import entropy
from medsec.tasks.gan import (
    GANTask,
    cipher_levels,
    fixed_secrets,
    quantize,
    random_secrets,
    secret_noise,
)


class EncipherGANTask(GANTask):
    """Train keyed encryption and decryption generators.

    Logs ``train/loss`` (generator side) with its terms, ``train/d_loss`` and, on validation/test,
    ``psnr`` and ``ssim`` of the decrypted images, ``wrong_key_psnr`` (decryption with another
    key, ideally low) and ``cipher_entropy`` (bits, ideal 8).

    Args:
        model: ``encryptor``, ``decryptor`` and ``critic`` configs (``medsec.models.encipher_gan``).
        optimizer: ``_partial_`` optimiser for both sides.
        cycle_weight, ssim_weight, adversarial_weight: weights of the generator-side terms.

    Judged by ``val/psnr`` of the decrypted images (max). Not attacked (a cipher: see ``medsec report``).
    """

    monitor = "val/psnr"
    mode = "max"

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any], cycle_weight: float = 10.0,
                 ssim_weight: float = 1.0, adversarial_weight: float = 1.0, **data_info: Any) -> None:
        super().__init__(model=model, optimizer=optimizer, **data_info)

    def configure_models(self) -> None:
        self.encryptor, self.decryptor = self.build("encryptor"), self.build("decryptor")
        self.cipher_critic, self.plain_critic = self.build("critic"), self.build("critic")

    def configure_losses(self) -> None:
        super().configure_losses()
        self.ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0)

    def configure_metrics(self) -> None:
        """Metrics are computed per batch in :meth:`evaluate` and averaged by Lightning."""

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.encryptor.parameters(), self.decryptor.parameters())

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.cipher_critic.parameters(), self.plain_critic.parameters())

    def key_maps(self, images: torch.Tensor, secrets: list[bytes]) -> torch.Tensor:
        return secret_noise(secrets, images.shape[1:]).to(images)

    def forward(self, images: torch.Tensor, key_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(8-bit-rounded cipher images, decrypted images), both in [0, 1]."""
        cipher = quantize(self.encryptor(images, key_maps))
        return cipher, self.decryptor(cipher, key_maps)

    def generate(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        cipher, decrypted = self(images, self.key_maps(images, random_secrets(len(images))))
        return {"cipher": cipher, "decrypted": decrypted}

    def discriminator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cipher, decrypted = fakes["cipher"].detach(), fakes["decrypted"].detach()
        cipher_term = self.lsgan(self.cipher_critic(torch.rand_like(cipher)), True) + \
            self.lsgan(self.cipher_critic(cipher), False)
        plain_term = self.lsgan(self.plain_critic(images), True) + self.lsgan(self.plain_critic(decrypted), False)
        return {"cipher": 0.5 * cipher_term, "plain": 0.5 * plain_term}

    def generator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        adversarial = self.lsgan(self.cipher_critic(fakes["cipher"]), True) + \
            self.lsgan(self.plain_critic(fakes["decrypted"]), True)
        return {"adversarial": hp.adversarial_weight * adversarial,
                "cycle": hp.cycle_weight * F.l1_loss(fakes["decrypted"], images),
                "ssim": hp.ssim_weight * self.ssim_loss(fakes["decrypted"], images)}

    def evaluate(self, images: torch.Tensor) -> dict[str, torch.Tensor | float]:
        secrets = fixed_secrets(len(images), "encipher_gan")
        cipher, decrypted = self(images, self.key_maps(images, secrets))
        wrong = self.decryptor(cipher, self.key_maps(images, fixed_secrets(len(images), "encipher_gan/wrong")))
        return {"psnr": peak_signal_noise_ratio(decrypted, images, data_range=1.0),
                "ssim": structural_similarity_index_measure(decrypted, images, data_range=1.0),
                "wrong_key_psnr": peak_signal_noise_ratio(wrong, images, data_range=1.0),
                "cipher_entropy": entropy(cipher_levels(cipher)[:, 0].cpu().numpy()).mean()}
