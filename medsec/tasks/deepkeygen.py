"""DeepKeyGen (after Ding, Tan et al., IEEE TNNLS 2021): a GAN that generates private key images.

The generator maps a seed image and a secret noise map (drawn from an explicit secret seed) to a
key image in the style of a *transformation domain*; a patch critic compares keys with samples
of that domain (``uniform``: i.i.d. uniform 8-bit noise, what an ideal key looks like). A key
image encrypts an image by XOR or modular addition (``mode``). A key is fixed by the generator's
weights and the secret seed, so it can be regenerated; stored, it is sealed with AES-GCM
(:func:`medsec.protections.key_images.save_key`). The cipher built on a trained task is
:class:`medsec.analysis.ciphers.learned.DeepKeyGenCipher`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsec.analysis.ciphers.statistics import correlation, entropy, npcr
from medsec.errors import ConfigError
from medsec.tasks.gan import (
    GANTask,
    cipher_levels,
    fixed_secrets,
    flip_first_bit,
    plain_levels,
    random_secrets,
    secret_noise,
    weights_digest,
)

MODES = ("xor", "add")
DOMAINS = ("uniform",)


def combine(images: np.ndarray, key: np.ndarray, mode: str) -> np.ndarray:
    """Encrypt 8-bit images with an 8-bit key image: XOR, or addition modulo 256."""
    if mode == "xor":
        return images ^ key
    return ((images.astype(np.int16) + key) % 256).astype(np.uint8)


def separate(cipher_images: np.ndarray, key: np.ndarray, mode: str) -> np.ndarray:
    """Invert :func:`combine`."""
    if mode == "xor":
        return cipher_images ^ key
    return ((cipher_images.astype(np.int16) - key) % 256).astype(np.uint8)


def seed_image(secret: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The seed image used at key generation: a smooth tissue-like field (8x8 noise from the
    secret, upsampled bicubically into [0.15, 0.6]), so (weights, secret) alone fix the key."""
    coarse = secret_noise([secret + b"/seed-image"], (1, 8, 8))
    smooth = F.interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=False)
    return 0.15 + 0.45 * smooth.clamp(0, 1)


class DeepKeyGenTask(GANTask):
    """Train a key generator against a transformation domain.

    Logs ``train/loss`` (generator), ``train/d_loss`` and, on validation/test, ``key_entropy``
    (bits, ideal 8), ``key_npcr`` (percent of key pixels that change when one secret bit flips,
    ideal 99.61), ``cipher_entropy`` and ``cipher_correlation`` (horizontal, ideal 0) of the
    images encrypted with the keys.

    Args:
        model: ``generator`` and ``discriminator`` configs (``medsec.models.deepkeygen``).
        optimizer: ``_partial_`` optimiser for both sides.
        mode: ``xor`` or ``add`` (modular addition) diffusion with the key image.
        domain: the transformation domain the critic compares keys with (``uniform``).
        diversity_weight: weight of the mode-seeking term (Mao et al. 2019), which keeps keys of
            different secrets apart.

    Judged by ``val/key_entropy`` (max). Not attacked (a cipher: see ``medsec report``).
    """

    monitor = "val/key_entropy"
    mode = "max"

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any], mode: str = "xor",
                 domain: str = "uniform", diversity_weight: float = 1.0, **data_info: Any) -> None:
        if mode not in MODES:
            raise ConfigError(f"task.mode must be one of {list(MODES)}, got '{mode}'")
        if domain not in DOMAINS:
            raise ConfigError(f"task.domain must be one of {list(DOMAINS)}, got '{domain}'")
        super().__init__(model=model, optimizer=optimizer, **data_info)

    def configure_models(self) -> None:
        self.generator = self.build("generator")
        self.discriminator = self.build("discriminator")

    def configure_metrics(self) -> None:
        """Metrics are computed per batch in :meth:`evaluate` and averaged by Lightning."""

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return self.generator.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.discriminator.parameters()

    def forward(self, seed_images: torch.Tensor, secrets: Sequence[bytes]) -> torch.Tensor:
        """Key images in [0, 1] for seed images and one secret each."""
        noise = secret_noise(secrets, seed_images.shape[1:]).to(seed_images)
        return self.generator(seed_images, noise)

    def generate(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        first, second = random_secrets(len(images)), random_secrets(len(images))
        return {"keys": self(images, first), "other_keys": self(images, second)}

    def domain_sample(self, like: torch.Tensor) -> torch.Tensor:
        return torch.rand_like(like)

    def discriminator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = fakes["keys"].detach()
        real, fake = self.discriminator(self.domain_sample(keys)), self.discriminator(keys)
        return {"adversarial": 0.5 * (self.lsgan(real, True) + self.lsgan(fake, False))}

    def generator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spread = (fakes["keys"] - fakes["other_keys"]).abs().mean()
        return {"adversarial": self.lsgan(self.discriminator(fakes["keys"]), True),
                "diversity": self.hparams.diversity_weight / (spread + 1e-3)}

    def key_levels(self, seed_images: torch.Tensor, secrets: Sequence[bytes]) -> np.ndarray:
        """8-bit key images ``(N, H, W)``."""
        with torch.no_grad():
            return cipher_levels(self(seed_images, secrets))[:, 0].cpu().numpy()

    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        secrets = fixed_secrets(len(images), "deepkeygen")
        keys = self.key_levels(images, secrets)
        flipped = self.key_levels(images, [flip_first_bit(s) for s in secrets])
        cipher = combine(plain_levels(images)[:, 0].cpu().numpy(), keys, self.hparams.mode)
        return {"key_entropy": entropy(keys).mean(), "key_npcr": npcr(keys, flipped).mean(),
                "cipher_entropy": entropy(cipher).mean(),
                "cipher_correlation": np.nanmean(correlation(cipher, "horizontal"))}

    def generate_key(self, secret: bytes, shape: Sequence[int]) -> np.ndarray:
        """The 8-bit key image ``shape`` for ``secret``: the same weights and secret give the same key."""
        return self.key_levels(seed_image(secret, shape).to(self.device), [secret])[0]

    def weights_digest(self) -> str:
        """SHA-256 of the generator's weights: with the secret, what a key is regenerated from."""
        return weights_digest(self.generator)
