"""From a trained PyTorch classifier to a CKKS program: a list of affine and square layers.

The network's input normalisation is folded into the first layer, so the client encrypts the
pixels exactly as the data pipeline hands them to the network ([0, 1]). Every layer keeps its
dense ``[in, out]`` matrix (used by the SIMD "throughput" evaluator, which skips zeros); the
convolution also keeps its kernel for the im2col "latency" evaluator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsec.crypto.he.planner import CKKSParams, plan_parameters
from medsec.errors import ConfigError
from medsec.models.classifiers import Classifier
from medsec.models.he_cnn import Square

SKIPPED = (nn.Flatten, nn.Dropout, nn.Identity)
"""Layers that do nothing at inference on a flat vector."""


@dataclass
class Layer:
    """One rescaling step: ``x @ matrix + bias`` (``kind='affine'``) or ``x * x`` (``'square'``).
    A convolution also carries ``kernel`` ([out, in, k, k]) and ``stride``."""

    kind: str
    matrix: np.ndarray | None = None
    bias: np.ndarray | None = None
    kernel: np.ndarray | None = None
    stride: int = 1

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x * x if self.kind == "square" else x @ self.matrix + self.bias


@dataclass
class HEProgram:
    """The compiled model: layers in order, the (C, H, W) input shape and the largest magnitude
    seen at any layer on the calibration images."""

    layers: list[Layer]
    input_shape: tuple[int, int, int]
    num_classes: int
    max_abs: float = 0.0
    widths: list[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def levels(self, mode: str) -> int:
        """Rescales one evaluation takes: one per layer, plus one in latency mode for TenSEAL's
        ``pack_vectors`` (it multiplies by selection masks to gather the channels)."""
        return self.depth + (mode == "latency")

    @property
    def conv(self) -> Layer:
        return self.layers[0]

    def windows(self) -> int:
        """Output positions of the first (convolution) layer."""
        return self.conv.matrix.shape[1] // self.conv.kernel.shape[0]

    def im2col_size(self) -> int:
        """Values of one channel's im2col encoding: TenSEAL pads each window's row of ``k*k``
        pixels to the next power of two."""
        return self.windows() * 2 ** math.ceil(math.log2(self.conv.kernel[0, 0].size))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation in float64 on ``[n, C*H*W]`` pixels; the reference for the
        encrypted result."""
        for layer in self.layers:
            x = layer.apply(x)
        return x

    def plan(self, precision_bits: int, mode: str, batch_size: int = 1) -> CKKSParams:
        """CKKS parameters for ``mode``: ``throughput`` needs a slot per image, ``latency`` a slot
        per im2col entry and per activation."""
        if mode == "throughput":
            slots = batch_size
        else:
            slots = max(self.im2col_size(), *self.widths)
        return plan_parameters(self.levels(mode), self.max_abs, precision_bits, slots)

    def card(self, precision_bits: int) -> ModelCard:
        """The public description a client needs, with parameters for both modes."""
        kernel = self.conv.kernel
        return ModelCard(self.input_shape, self.num_classes, kernel.shape[-1], self.conv.stride,
                         {mode: self.plan(precision_bits, mode) for mode in ("throughput", "latency")})


@dataclass(frozen=True)
class ModelCard:
    """What a client must know about the served model: input shape, classes, the convolution's
    kernel and stride (for im2col) and the CKKS parameters of each mode. Public by design."""

    input_shape: tuple[int, int, int]
    num_classes: int
    kernel_size: int
    stride: int
    params: dict[str, CKKSParams]

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes, "kernel_size": self.kernel_size,
                "stride": self.stride, "params": {mode: p.to_dict() for mode, p in self.params.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ModelCard:
        return cls(tuple(data["input_shape"]), int(data["num_classes"]), int(data["kernel_size"]), int(data["stride"]),
                   {mode: CKKSParams.from_dict(p) for mode, p in data["params"].items()})


def compile_model(net: nn.Module, calibration: torch.Tensor) -> HEProgram:
    """Compile ``net`` (a :func:`medsec.models.he_cnn` classifier, in eval mode) for images shaped
    like ``calibration`` ([n, C, H, W] in [0, 1]); the calibration images bound the values
    every layer produces (with a factor-2 margin).

    Raises:
        ConfigError: a layer that CKKS cannot evaluate (ReLU, pooling, batch norm, padding ...).
    """
    if not isinstance(net, Classifier) or not isinstance(net.backbone, nn.Sequential):
        raise ConfigError(f"model: `medsec he` needs model=he_cnn (conv -> square -> linear -> square -> linear), "
                          f"got {type(net).__name__}")
    shape = tuple(calibration.shape[1:])
    if len(shape) != 3:
        raise ConfigError(f"data: `medsec he` needs 2D images [C, H, W], got {list(shape)}")
    mean = net.mean.double().reshape(-1, 1, 1).expand(shape).reshape(-1).numpy()
    std = net.std.double().reshape(-1, 1, 1).expand(shape).reshape(-1).numpy()
    layers: list[Layer] = []
    in_shape: tuple[int, ...] = shape
    modules = [*net.backbone.named_children(), ("head", net.head)]
    for name, module in modules:
        if isinstance(module, SKIPPED):
            continue
        if isinstance(module, Square):
            layers.append(Layer("square"))
        elif isinstance(module, nn.Conv2d) and not layers:
            layers.append(_conv_layer(module, in_shape, name))
        elif isinstance(module, nn.Linear):
            layers.append(Layer("affine", _numpy(module.weight).T.copy(), _bias(module, module.out_features)))
        else:
            raise ConfigError(f"model: layer '{name}' ({type(module).__name__}) cannot be evaluated under CKKS; "
                              "`medsec he` takes conv (first, no padding) -> square -> linear -> square -> linear")
    if not layers or layers[0].kernel is None:
        raise ConfigError("model: `medsec he` needs a convolution as the first layer")
    first = layers[0]  # fold (x - mean) / std into the first affine map
    first.bias = first.bias - (mean / std) @ first.matrix
    first.matrix = first.matrix / std[:, None]
    first.kernel = first.kernel / net.std.double().numpy()[None, :, None, None]
    widths = [layer.matrix.shape[1] for layer in layers if layer.kind == "affine"]
    program = HEProgram(layers, shape, widths[-1], widths=widths)
    program.max_abs = 2.0 * _max_abs(program, calibration.reshape(len(calibration), -1).double().numpy())
    return program


def _conv_layer(conv: nn.Conv2d, in_shape: tuple[int, ...], name: str) -> Layer:
    """A convolution as a dense matrix (its response to each input pixel) plus its kernel."""
    square = conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
    if conv.padding not in ((0, 0), "valid") or conv.groups != 1 or conv.dilation != (1, 1) or not square:
        raise ConfigError(f"model: layer '{name}': `medsec he` needs a square convolution without padding, "
                          "groups or dilation")
    size = int(np.prod(in_shape))
    with torch.no_grad():
        basis = torch.eye(size, dtype=torch.float64).reshape(size, *in_shape)
        matrix = F.conv2d(basis, conv.weight.double(), stride=conv.stride).reshape(size, -1).numpy()
    windows = matrix.shape[1] // conv.out_channels
    return Layer("affine", matrix, np.repeat(_bias(conv, conv.out_channels), windows), _numpy(conv.weight),
                 conv.stride[0])


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _bias(module: nn.Module, width: int) -> np.ndarray:
    return _numpy(module.bias) if module.bias is not None else np.zeros(width)


def _max_abs(program: HEProgram, x: np.ndarray) -> float:
    """Largest magnitude of the input and of every layer's output on ``x``."""
    peak = float(np.abs(x).max())
    for layer in program.layers:
        x = layer.apply(x)
        peak = max(peak, float(np.abs(x).max()))
    return peak
