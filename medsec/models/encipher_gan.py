"""EncipherGAN's networks: keyed encryption/decryption generators and patch critics (MONAI blocks)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import PatchDiscriminator, UNet
from torch import nn


class KeyedUNet(nn.Module):
    """An image and a key map (concatenated as channels) -> an image in [0, 1], through a MONAI
    U-Net with a sigmoid output. Fully convolutional: any size divisible by the strides' product."""

    def __init__(self, in_channels: int = 1, key_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                 strides: Sequence[int] = (2, 2), num_res_units: int = 1, spatial_dims: int = 2) -> None:
        super().__init__()
        self.unet = UNet(spatial_dims=spatial_dims, in_channels=in_channels + key_channels, out_channels=in_channels,
                         channels=channels, strides=strides, num_res_units=num_res_units)

    def forward(self, image: torch.Tensor, key_map: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(torch.cat([image, key_map], dim=1)))


class PatchCritic(nn.Module):
    """PatchGAN discriminator (MONAI ``PatchDiscriminator``, instance norm): one realness score per patch."""

    def __init__(self, in_channels: int = 1, channels: int = 16, num_layers: int = 3, spatial_dims: int = 2) -> None:
        super().__init__()
        self.net = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels,
                                      num_layers_d=num_layers, norm="INSTANCE")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)[-1]
