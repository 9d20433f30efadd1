"""HE-friendly classifiers: only operations CKKS evaluates exactly (affine maps and squares).

- :func:`he_cnn`: ``normalise -> conv (no padding) -> square -> [linear -> square]* -> linear``, the
  layout of CryptoNets (Gilad-Bachrach et al. 2016) and of TenSEAL's encrypted-CNN tutorial. Each
  layer costs one level of the CKKS modulus chain, so ``hidden`` sets the multiplicative depth.
- :func:`he_cnn_deep`: ``[conv -> batch norm -> activation (-> average pool)]`` per block, then
  the same linear layers. The activation is a trainable ``a x^2 + b x`` started as a fit of ReLU
  (:class:`PolyAct`; on PneumoniaMNIST it generalises clearly better than batch norm and a plain
  square, although both span the same functions), or ``x^2``. Under CKKS either is one square; the
  HE compiler fuses each run of affine modules (convolution, batch norm, pooling, linear, the
  activation's shift and scale) into one layer, so a block costs two levels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medsec.errors import ConfigError
from medsec.models.classifiers import Classifier


class Square(nn.Module):
    """``x * x``: the polynomial activation of CryptoNets (one ciphertext multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class PolyAct(nn.Module):
    """``a x^2 + b x`` with trainable ``a`` and ``b``: a degree-2 activation that starts as the
    least-squares fit of ReLU on N(0, 1) inputs (a = 0.2, b = 0.5). Under CKKS it is one square,
    ``a (x + b / 2a)^2 - b^2 / 4a``, the shift and scale folded into the affine layers around it."""

    def __init__(self, a: float = 0.2, b: float = 0.5) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x * x + self.b * x


ACTIVATIONS = {"square": Square, "poly": PolyAct}


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


BLOCK_KEYS = {"channels", "kernel_size", "stride", "padding", "pool"}


def he_cnn_deep(
    num_classes: int,
    in_channels: int = 1,
    spatial_dims: int = 2,
    image_size: int = 28,
    blocks: Sequence[Mapping[str, int]] = ({"channels": 8, "kernel_size": 7, "stride": 3},),
    hidden: Sequence[int] = (64,),
    dropout: float = 0.3,
    activation: str = "poly",
) -> Classifier:
    """Per block (``channels``, ``kernel_size``, ``stride`` = 1, ``padding`` = 0, ``pool`` = 1):
    conv -> batch norm -> activation [-> average pool(``pool``)]; then flatten -> [linear(h) ->
    batch norm -> activation for h in ``hidden``] -> dropout -> linear(``num_classes``), for
    ``image_size`` square 2D images. ``activation``: ``poly`` (:class:`PolyAct`) or ``square``."""
    if spatial_dims != 2:
        raise ConfigError(f"model 'he_cnn_deep' is 2D only, got spatial_dims={spatial_dims}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"model.net.activation must be one of {list(ACTIVATIONS)}, got '{activation}'")
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    width = in_channels
    for i, block in enumerate(blocks):
        layers += _conv_block(i, dict(block), width, act)
        width = block["channels"]
    layers.append(nn.Flatten())
    width = _output_width(nn.Sequential(*layers), in_channels, image_size)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.BatchNorm1d(h), act()]
        width = h
    layers.append(nn.Dropout(dropout))
    return Classifier(nn.Sequential(*layers), width, num_classes)


def _conv_block(index: int, block: dict[str, int], in_channels: int, act: type[nn.Module]) -> list[nn.Module]:
    """conv -> batch norm -> ``act`` [-> average pool] for one entry of ``blocks``."""
    unknown = set(block) - BLOCK_KEYS
    if unknown or "channels" not in block or "kernel_size" not in block:
        raise ConfigError(f"model.net.blocks[{index}]: needs channels and kernel_size, may have "
                          f"{sorted(BLOCK_KEYS)}; got {sorted(block)}")
    channels, pool = block["channels"], block.get("pool", 1)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, channels, block["kernel_size"], stride=block.get("stride", 1),
                  padding=block.get("padding", 0)),
        nn.BatchNorm2d(channels), act()]
    return layers + [nn.AvgPool2d(pool)] if pool > 1 else layers


def _output_width(net: nn.Module, in_channels: int, image_size: int) -> int:
    """Features ``net`` makes of one ``image_size`` square image."""
    try:
        with torch.no_grad():
            width = net.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
    except RuntimeError as err:
        raise ConfigError(f"model.net.blocks do not fit image_size {image_size}: {err}") from None
    net.train()
    return width
