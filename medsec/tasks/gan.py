"""What the GAN tasks share: two optimisers under manual optimisation, LSGAN losses, secret noise
maps and 8-bit cipher levels. (:mod:`medsec.analysis.ciphers.learned` turns a trained task into an
:class:`~medsec.analysis.ciphers.classical.ImageCipher`.)"""
from __future__ import annotations

import hashlib
import secrets
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from medsec.core.registry import safe_instantiate
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask

SECRET_BYTES = 32


def random_secrets(count: int) -> list[bytes]:
    """``count`` fresh random secrets (training draws a new key per image)."""
    return [secrets.token_bytes(SECRET_BYTES) for _ in range(count)]


def fixed_secrets(count: int, label: str) -> list[bytes]:
    """Public, reproducible secrets for validation metrics (never used to protect data)."""
    return [hashlib.sha256(f"medsec/validation/{label}/{i}".encode()).digest() for i in range(count)]


def flip_first_bit(secret: bytes) -> bytes:
    """``secret`` with its first bit (the least significant bit of the first byte) inverted."""
    return bytes([secret[0] ^ 1]) + secret[1:]


def secret_noise(secret_list: Sequence[bytes], shape: Sequence[int]) -> torch.Tensor:
    """One uniform noise map of ``shape`` per secret, from a torch generator seeded with 64 bits of
    SHA-256 of the secret: the same secret always gives the same map, any changed bit another one.
    (So a learned cipher's effective key space is at most 64 bits.)"""
    maps = []
    for secret in secret_list:
        seed = int.from_bytes(hashlib.sha256(b"medsec/gan-noise/" + secret).digest()[:8], "big")
        maps.append(torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed)))
    return torch.stack(maps)


def cipher_levels(images: torch.Tensor) -> torch.Tensor:
    """Cipher (or key) images in [0, 1] as 8-bit levels, ``floor(256 x)``: uniform values give
    uniform levels. (Plain images use the data pipeline's ``x = level / 255``.)"""
    return (images * 256).floor().clamp(0, 255).to(torch.uint8)


def from_cipher_levels(levels: torch.Tensor) -> torch.Tensor:
    """The [0, 1] value each 8-bit cipher level stands for (the middle of its bin)."""
    return (levels.float() + 0.5) / 256


def plain_levels(images: torch.Tensor) -> torch.Tensor:
    """Plain images in [0, 1] as 8-bit levels (the inverse of the data pipeline's ``level / 255``)."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels a stored cipher image has, passing gradients straight through."""
    return images + (from_cipher_levels(cipher_levels(images)) - images).detach()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes and values), in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class GANTask(BaseTask):
    """A generator side and a discriminator side, each with its own optimiser (the same
    ``optimizer`` config), trained in turn with Lightning's manual optimisation on LSGAN losses.

    Subclasses build the networks, say which parameters belong to which side, and implement
    :meth:`generate`, :meth:`discriminator_loss`, :meth:`generator_loss` and :meth:`evaluate`.

    Args:
        model: the ``model`` config (one sub-config per network).
        optimizer: ``_partial_`` optimiser config, used for both sides.
        crop_size: train on one random ``crop_size`` square per batch (the networks are fully
            convolutional; validation and test see whole images), ``None``: whole images.
        in_channels, spatial_dims, class_names: from the data module (the other data facts a data
            module gives, ``num_classes``, ``multilabel``, ``class_counts``, are accepted and unused).
    """

    automatic_optimization = False

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any], crop_size: int | None = None,
                 in_channels: int = 1, spatial_dims: int = 2, class_names: Sequence[str] | None = None,
                 **data_info: Any) -> None:
        if spatial_dims != 2:
            raise ConfigError(f"the GAN ciphers work on 2D images; the data have spatial_dims={spatial_dims}")
        self.class_names = list(class_names or [])
        super().__init__(model=model, optimizer=optimizer)

    def build(self, name: str) -> nn.Module:
        """Instantiate ``model.<name>`` for this data's channels."""
        if name not in self.hparams.model:
            raise ConfigError(f"model.{name} is missing: {type(self).__name__} needs it")
        return safe_instantiate(self.hparams.model[name], f"model.{name}", ("network",),
                                in_channels=self.hparams.in_channels)

    def configure_losses(self) -> None:
        self.adversarial = nn.MSELoss()

    def lsgan(self, scores: torch.Tensor, real: bool) -> torch.Tensor:
        """Least-squares GAN loss towards 1 (real) or 0 (fake)."""
        return self.adversarial(scores, torch.full_like(scores, float(real)))

    @abstractmethod
    def generator_parameters(self) -> Iterator[nn.Parameter]: ...

    @abstractmethod
    def discriminator_parameters(self) -> Iterator[nn.Parameter]: ...

    @abstractmethod
    def generate(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the generators make from a batch (with gradients)."""

    @abstractmethod
    def discriminator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms of the discriminator side (use detached fakes)."""

    @abstractmethod
    def generator_loss(self, images: torch.Tensor, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named, weighted loss terms of the generator side."""

    @abstractmethod
    def evaluate(self, images: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Validation/test metrics of a batch, by name."""

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """One random ``crop_size`` square of the batch (the whole images without ``crop_size``)."""
        size = self.hparams.crop_size
        height, width = images.shape[-2:]
        if not size or (size >= height and size >= width):
            return images
        top, left = (int(torch.randint(max(extent - size, 0) + 1, ())) for extent in (height, width))
        return images[..., top:top + size, left:left + size]

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        images = self.crop(batch["image"])
        opt_g, opt_d = self.optimizers()
        fakes = self.generate(images)
        d_terms = self.discriminator_loss(images, fakes)
        d_loss = sum(d_terms.values())
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_terms = self.generator_loss(images, fakes)
        g_loss = sum(g_terms.values())
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        logs = {"loss": g_loss, "d_loss": d_loss, **{f"g_{k}": v for k, v in g_terms.items()}}
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, on_step=True, on_epoch=True,
                      batch_size=len(images), prog_bar=False)

    def _evaluate_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        values = self.evaluate(batch["image"])
        self.log_dict({f"{stage}/{k}": float(v) for k, v in values.items()}, on_epoch=True,
                      batch_size=len(batch["image"]), sync_dist=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_step(batch, "test")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        make = safe_instantiate(self.hparams.optimizer, "task.optimizer", ("optimizer",))
        return [make(params=list(self.generator_parameters())), make(params=list(self.discriminator_parameters()))]

    def attack_objective(self) -> NoReturn:
        raise ConfigError(f"{type(self).__name__} cannot be attacked: a learned cipher is judged by "
                          "`medsec report cipher=...`, not by adversarial attacks")
