"""Image denoisers: a convolutional denoising autoencoder and a DnCNN-style residual network.

Both map a noisy image (B, C, *spatial) to a denoised image of the same shape and are built from
MONAI's ``Convolution`` blocks. (MONAI's ``AutoEncoder`` is used directly from a config.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn


class DenoisingAutoencoder(nn.Module):
    """Encoder of strided convolutions down to a bottleneck, decoder of transposed convolutions,
    sigmoid output in [0, 1] (Vincent et al.'s denoising autoencoder, convolutional; no skip
    connections, so the image must pass through the bottleneck).

    Inputs whose size is not a multiple of ``2 ** len(channels)`` are reflect-padded and the output
    cropped back.

    Args:
        in_channels: image channels (the output has the same).
        channels: feature maps per level; each level halves the resolution.
        spatial_dims: 2 or 3.
        norm: MONAI norm name for the hidden layers.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 96), spatial_dims: int = 2,
                 norm: str | None = "batch") -> None:
        super().__init__()
        self.factor = 2 ** len(channels)
        block = dict(spatial_dims=spatial_dims, act="relu", norm=norm)
        widths = [in_channels, *channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            encoder += [Convolution(in_channels=c_in, out_channels=c_out, strides=2, **block),
                        Convolution(in_channels=c_out, out_channels=c_out, **block)]
        decoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:0:-1], [*widths[-2:0:-1], widths[1]]):
            decoder += [Convolution(in_channels=c_in, out_channels=c_out, strides=2, is_transposed=True, **block),
                        Convolution(in_channels=c_out, out_channels=c_out, **block)]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.head = Convolution(spatial_dims, widths[1], in_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pads = [p for extent in reversed(size) for p in (0, -extent % self.factor)]
        padded = F.pad(x, pads, mode="reflect") if any(pads) else x
        out = torch.sigmoid(self.head(self.decoder(self.encoder(padded))))
        return out[(..., *(slice(0, extent) for extent in size))]


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017): ``depth`` 3x3 convolutions (ReLU; batch norm inside) predict the
    noise, which is subtracted from the input (residual learning).

    Args:
        in_channels: image channels (the output has the same).
        depth: convolution layers (17 in the paper).
        features: feature maps per hidden layer (64 in the paper).
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int = 1, depth: int = 17, features: int = 64, spatial_dims: int = 2) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN needs depth >= 3, got {depth}")
        layers: list[nn.Module] = [Convolution(spatial_dims, in_channels, features, act="relu", norm=None)]
        layers += [Convolution(spatial_dims, features, features, act="relu", norm="batch", bias=False)
                   for _ in range(depth - 2)]
        layers.append(Convolution(spatial_dims, features, in_channels, conv_only=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)
