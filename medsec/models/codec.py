"""A learned image codec on CompressAI: the mean-scale hyperprior (Minnen et al. 2018) for grey
(or RGB) images in [0, 1], with CompressAI's own range coder.

``image -> g_a -> y -> h_a -> z``; ``z`` is coded under a learned factorised density (the entropy
bottleneck), ``y`` under Gaussians whose means and scales ``h_s`` predicts from ``z``; ``g_s``
decodes. Train it with ``task=compression`` (rate-distortion loss plus CompressAI's auxiliary
loss for the bottleneck's quantiles).

The range coder's CDF tables are derived from the weights: they are not saved (non-persistent
buffers, so a checkpoint cannot set their sizes) and :meth:`HyperpriorCodec.update` rebuilds
them after every ``load_state_dict`` and before coding, refusing tables longer than
:data:`MAX_CDF_LENGTH`. Importing this module imports CompressAI (seconds): import it lazily.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.google import MeanScaleHyperprior
from compressai.models.utils import conv, deconv

DERIVED_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
"""Buffers of CompressAI's entropy models that :meth:`HyperpriorCodec.update` computes from the weights."""
MAX_CDF_LENGTH = 1 << 12
"""Longest CDF table (symbols per latent channel) a trained model may have; CompressAI's default
tables have at most about 1 600 entries (scale 256 at tail mass 1e-9)."""


def _rebuild_tables(module: HyperpriorCodec, incompatible_keys: Any) -> None:
    """After any ``load_state_dict`` (this module's or a parent's): the coder tables of the new weights."""
    module.update(force=True)


class HyperpriorCodec(MeanScaleHyperprior):
    """CompressAI's mean-scale hyperprior with ``in_channels`` image channels.

    Images of any size: :meth:`compress_image` pads to a multiple of :attr:`factor` (64) by edge
    replication and :meth:`decompress_image` crops back.

    Args:
        in_channels: image channels, 1 (grey) or 3.
        N: feature maps of the transforms and of the hyper-latent ``z``.
        M: channels of the latent ``y``.
    """

    factor = 64
    """Total downsampling of ``z``: inputs are padded to a multiple of it."""

    def __init__(self, in_channels: int = 1, N: int = 64, M: int = 96) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if N < 1 or M < 1:
            raise ValueError(f"N and M must be positive, got N={N}, M={M}")
        super().__init__(N=N, M=M)
        self.in_channels = in_channels
        self.coder = "compressai/mean-scale-hyperprior"
        self.g_a[0] = conv(in_channels, N)
        self.g_s[-1] = deconv(N, in_channels)
        for module in self.entropy_models():
            for name in DERIVED_BUFFERS:
                if name in module._buffers:
                    module.register_buffer(name, module._buffers[name], persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_tables)
        self.update(force=True)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` (not CompressAI's, which resizes the CDF buffers to what the
        file holds); the tables are rebuilt afterwards by :meth:`update`."""
        return torch.nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def entropy_models(self) -> list[torch.nn.Module]:
        return [m for m in self.modules() if isinstance(m, (EntropyBottleneck, GaussianConditional))]

    def update(self, scale_table: torch.Tensor | None = None, force: bool = False,
               update_quantiles: bool = False) -> bool:
        """Rebuild the CDF tables from the weights (CompressAI's ``update``), refusing quantiles that
        would make a table longer than :data:`MAX_CDF_LENGTH` before building anything."""
        for module in self.entropy_models():
            if isinstance(module, EntropyBottleneck):
                quantiles = module.quantiles.detach()[:, 0]
                medians = quantiles[:, 1]
                spans = (medians - quantiles[:, 0]).ceil().clamp(min=0) + (quantiles[:, 2] - medians).ceil().clamp(min=0)
                longest = float(spans.max()) + 1
                if not longest <= MAX_CDF_LENGTH:  # NaN included
                    raise ValueError(f"entropy bottleneck: its quantiles span {longest} symbols, more than "
                                     f"{MAX_CDF_LENGTH}: they have diverged")
        return super().update(scale_table, force=force, update_quantiles=update_quantiles)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) edge-padded on the right and bottom to a multiple of :attr:`factor`."""
        pads = (0, -x.shape[-1] % self.factor, 0, -x.shape[-2] % self.factor)
        return F.pad(x, pads, mode="replicate") if any(pads) else x

    def latent_shape(self, size: Sequence[int]) -> tuple[int, int]:
        """Spatial shape of ``z`` for an image of spatial ``size`` (H, W)."""
        return tuple(-(-extent // self.factor) for extent in size)  # type: ignore[return-value]

    def forward_padded(self, x: torch.Tensor) -> dict[str, Any]:
        """CompressAI's forward on the padded images, ``x_hat`` cropped to the input's size."""
        out = self(self.pad(x))
        out["x_hat"] = out["x_hat"][..., :x.shape[-2], :x.shape[-1]]
        return out

    @torch.no_grad()
    def compress_image(self, image: torch.Tensor) -> tuple[bytes, bytes]:
        """The (y, z) bit strings of one image (C, H, W) in [0, 1]."""
        out = self.compress(self.pad(image.unsqueeze(0)))
        (y_string,), (z_string,) = out["strings"]
        return y_string, z_string

    @torch.no_grad()
    def decompress_image(self, y_string: bytes, z_string: bytes, size: Sequence[int]) -> torch.Tensor:
        """The image (C, H, W) in [0, 1] that :meth:`compress_image` coded, for spatial ``size``."""
        out = self.decompress([[y_string], [z_string]], self.latent_shape(size))
        return out["x_hat"][0, :, :size[0], :size[1]]

