"""An HE-friendly classifier: only operations CKKS evaluates exactly (affine maps and squares).

``normalise -> conv (no padding) -> square -> [linear -> square]* -> linear``: the layout of
CryptoNets (Gilad-Bachrach et al. 2016) and of TenSEAL's encrypted-CNN tutorial. Each layer costs
one level of the CKKS modulus chain, so ``hidden`` sets the multiplicative depth.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsec.errors import ConfigError
from medsec.models.classifiers import Classifier


class Square(nn.Module):
    """``x * x``: the polynomial activation of CryptoNets (one ciphertext multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def he_cnn(
    num_classes: int,
    in_channels: int = 1,
    spatial_dims: int = 2,
    image_size: int = 28,
    channels: int = 4,
    kernel_size: int = 7,
    stride: int = 3,
    hidden: Sequence[int] = (32,),
) -> Classifier:
    """conv(``channels``, ``kernel_size``, ``stride``, no padding) -> square -> flatten ->
    [linear(h) -> square for h in ``hidden``] -> linear(``num_classes``), for ``image_size``
    square 2D images."""
    if spatial_dims != 2:
        raise ConfigError(f"model 'he_cnn' is 2D only, got spatial_dims={spatial_dims}")
    side = (image_size - kernel_size) // stride + 1
    if side < 1:
        raise ConfigError(f"model.net: kernel_size {kernel_size} does not fit image_size {image_size}")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, kernel_size, stride=stride), Square(), nn.Flatten()]
    width = channels * side * side
    for h in hidden:
        layers += [nn.Linear(width, h), Square()]
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)
