"""A compressive autoencoder whose bottleneck is a small integer latent, ready for entropy coding.

``image -> encoder -> bounded latent -> quantiser -> integer latent -> decoder -> image``. The
latent is bounded to ``levels`` integer values per element (``levels`` odd; symbols
``-(levels // 2) .. levels // 2``), as in finite scalar quantisation (Mentzer et al. 2023): the rate
is set by the architecture (latent channels, downsampling, levels) rather than by a rate term in
the loss, so any image-to-image task (``task=denoising``) trains it unchanged. The entropy model is
a per-channel categorical prior over the levels, kept in buffers (part of the state dict, so
sender and receiver share it with the weights) and refreshed during training like batch-norm
statistics; :meth:`fit_prior` sets it from the latents of a data set.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medsec.models.denoisers import DenoisingAutoencoder

QUANTISERS = ("ste", "noise")


class CompressiveAutoencoder(nn.Module):
    """Convolutional encoder/decoder (the :class:`DenoisingAutoencoder` trunk) around a quantised
    latent of ``latent_channels`` maps at ``1 / 2 ** len(channels)`` of the input size.

    In training, the latent is quantised by straight-through rounding (``quantiser="ste"``) or by
    additive uniform noise (``"noise"``, Ballé et al. 2017); in evaluation by rounding. The image
    size need not be a multiple of the downsampling factor: the input is reflect-padded and
    :meth:`decode` crops back to ``size``.

    Args:
        in_channels: image channels (the output has the same).
        channels: feature maps per encoder level; each level halves the resolution.
        latent_channels: maps of the quantised latent.
        levels: quantisation levels per latent element (odd, at least 3).
        spatial_dims: 2 or 3.
        norm: MONAI norm name for the hidden layers.
        quantiser: ``ste`` or ``noise`` (training only).
        prior_momentum: weight of each training batch's latent histogram in the prior.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 96), latent_channels: int = 8,
                 levels: int = 5, spatial_dims: int = 2, norm: str | None = "batch", quantiser: str = "ste",
                 prior_momentum: float = 0.05) -> None:
        super().__init__()
        if levels < 3 or levels % 2 == 0:
            raise ValueError(f"levels must be odd and at least 3, got {levels}")
        if quantiser not in QUANTISERS:
            raise ValueError(f"quantiser must be one of {QUANTISERS}, got '{quantiser}'")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {latent_channels}")
        self.levels, self.latent_channels, self.quantiser = levels, latent_channels, quantiser
        self.prior_momentum = prior_momentum
        self.trunk = DenoisingAutoencoder(in_channels, channels, spatial_dims, norm)
        self.factor = self.trunk.factor
        self.to_latent = Convolution(spatial_dims, channels[-1], latent_channels, kernel_size=1, conv_only=True)
        self.from_latent = Convolution(spatial_dims, latent_channels, channels[-1], kernel_size=1, act="relu",
                                       norm=norm)
        self.register_buffer("prior", torch.full((latent_channels, levels), 1.0 / levels))

    @property
    def half(self) -> int:
        """The largest symbol magnitude: symbols run from ``-half`` to ``half``."""
        return self.levels // 2

    # ---- latent ------------------------------------------------------------------------------
    def analyse(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous latent in ``(-half, half)`` of ``x``, reflect-padded to the factor."""
        pads = [p for extent in reversed(x.shape[2:]) for p in (0, -extent % self.factor)]
        padded = F.pad(x, pads, mode="reflect") if any(pads) else x
        return self.half * torch.tanh(self.to_latent(self.trunk.encoder(padded)))

    def quantise(self, latent: torch.Tensor) -> torch.Tensor:
        """Rounding (evaluation), straight-through rounding or additive uniform noise (training)."""
        if not self.training:
            return torch.round(latent)
        if self.quantiser == "noise":
            return latent + torch.empty_like(latent).uniform_(-0.5, 0.5)
        return latent + (torch.round(latent) - latent).detach()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The integer latent (int64, values ``-half .. half``) of images ``x`` (B, C, *spatial)."""
        return torch.round(self.analyse(x)).long()

    def decode(self, latent: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Images in [0, 1] from a (quantised) latent, cropped to the spatial ``size`` when given."""
        out = torch.sigmoid(self.trunk.head(self.trunk.decoder(self.from_latent(latent.float()))))
        return out if size is None else out[(..., *(slice(0, extent) for extent in size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.analyse(x)
        if self.training and self.prior_momentum > 0:
            self.update_prior(torch.round(latent.detach()).long(), self.prior_momentum)
        return self.decode(self.quantise(latent), x.shape[2:])

    # ---- entropy model -----------------------------------------------------------------------
    def histogram(self, latent: torch.Tensor) -> torch.Tensor:
        """Per-channel symbol counts (latent_channels, levels) of an integer latent (B, C, *spatial)."""
        if latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent has {latent.shape[1]} channels, the model {self.latent_channels}")
        symbols = (latent.clamp(-self.half, self.half) + self.half).transpose(0, 1).reshape(self.latent_channels, -1)
        counts = torch.zeros(self.latent_channels, self.levels, device=latent.device)
        return counts.scatter_add_(1, symbols, torch.ones_like(symbols, dtype=counts.dtype))

    @torch.no_grad()
    def update_prior(self, latent: torch.Tensor, weight: float = 1.0) -> None:
        """Move the prior towards the add-one smoothed histogram of the integer ``latent`` by
        ``weight`` (``1``: replace it)."""
        self.set_prior_counts(self.histogram(latent), weight)

    @torch.no_grad()
    def set_prior_counts(self, counts: torch.Tensor, weight: float = 1.0) -> None:
        """Move the prior towards the add-one smoothed ``counts`` (latent_channels, levels) by ``weight``."""
        counts = counts + 1.0
        self.prior.mul_(1 - weight).add_(weight * counts / counts.sum(1, keepdim=True))

    @torch.no_grad()
    def fit_prior(self, images: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Set the prior to the latent histogram of ``images`` (a batch, or a sequence of batches)."""
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        self.set_prior_counts(sum(self.histogram(self.encode(batch)) for batch in batches))

    def estimated_bits(self, latent: torch.Tensor) -> float:
        """The information content (bits) of an integer latent under the prior: what an ideal
        entropy coder spends on it."""
        probs = self.prior.clamp_min(1e-9)
        symbols = (latent + self.half).transpose(0, 1).reshape(self.latent_channels, -1)
        return float(-torch.log2(torch.gather(probs, 1, symbols)).sum())
