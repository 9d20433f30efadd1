"""From a trained PyTorch classifier to a CKKS program: a list of affine and square layers.

The network's input normalisation is folded into the first layer, so the client encrypts the
pixels exactly as the data pipeline hands them to the network ([0, 1]). Every layer, a
convolution included, is a dense ``[in, out]`` matrix: the SIMD "throughput" evaluator uses it
directly (skipping zeros), the "latency" evaluator through its diagonals
(:mod:`medsec.he.diagonal`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medsec.core.layers import Layer, run_layers
from medsec.errors import ConfigError
from medsec.he.diagonal import DiagonalPlan, next_pow2, plan_layer
from medsec.he.planner import CKKSParams, plan_parameters
from medsec.models.classifiers import Classifier
from medsec.models.he_cnn import Square

SKIPPED = (nn.Flatten, nn.Dropout, nn.Identity)
"""Layers that do nothing at inference on a flat vector."""


@dataclass
class HEProgram:
    """The compiled model: layers in order, the (C, H, W) input shape and the largest magnitude
    seen at any layer on the calibration images."""

    layers: list[Layer]
    input_shape: tuple[int, int, int]
    num_classes: int
    max_abs: float = 0.0

    @property
    def widths(self) -> list[int]:
        """Output width of each affine layer."""
        return [layer.matrix.shape[1] for layer in self.layers if layer.kind == "affine"]

    @property
    def depth(self) -> int:
        """Rescales one evaluation takes: one per layer, in both modes."""
        return len(self.layers)

    def latency_slots(self) -> int:
        """Slots one image needs in latency mode: the largest layer side, padded to a power of two."""
        return max(next_pow2(max(layer.matrix.shape)) for layer in self.layers if layer.kind == "affine")

    def diagonal_plans(self, slots: int) -> list[DiagonalPlan | None]:
        """Each affine layer compiled for latency mode on ``slots`` slots (``None`` for a square)."""
        return [None if layer.kind == "square" else plan_layer(f"{i}", layer.matrix, layer.bias, slots)
                for i, layer in enumerate(self.layers)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation in float64 on ``[n, C*H*W]`` pixels; the reference for the
        encrypted result."""
        return run_layers(self.layers, x)

    def plan(self, precision_bits: int, mode: str, batch_size: int = 1) -> CKKSParams:
        """CKKS parameters for ``mode``: ``throughput`` needs a slot per image, ``latency`` the
        largest layer side."""
        slots = batch_size if mode == "throughput" else self.latency_slots()
        return plan_parameters(self.depth, self.max_abs, precision_bits, slots)

    def card(self, precision_bits: int) -> ModelCard:
        """The public description a client needs, with parameters for both modes."""
        return ModelCard(self.input_shape, self.num_classes,
                         {mode: self.plan(precision_bits, mode) for mode in ("throughput", "latency")})


@dataclass(frozen=True)
class ModelCard:
    """What a client must know about the served model: input shape, classes and the CKKS
    parameters of each mode. Public by design."""

    input_shape: tuple[int, int, int]
    num_classes: int
    params: dict[str, CKKSParams]

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "params": {mode: p.to_dict() for mode, p in self.params.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ModelCard:
        return cls(tuple(data["input_shape"]), int(data["num_classes"]),
                   {mode: CKKSParams.from_dict(p) for mode, p in data["params"].items()})


def compile_model(net: nn.Module, calibration: torch.Tensor) -> HEProgram:
    """Compile ``net`` (a :func:`medsec.models.he_cnn` classifier, in eval mode) for images shaped
    like ``calibration`` ([n, C, H, W] in [0, 1]); the calibration images bound the values
    every layer produces (with a factor-2 margin).

    Raises:
        ConfigError: a layer that CKKS cannot evaluate (ReLU, pooling, batch norm ...).
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
    probe = torch.zeros(1, *shape, dtype=torch.float64)  # tracks each layer's input shape
    twin = copy.deepcopy(net).double()  # the caller's network stays as it is
    modules = [*twin.backbone.named_children(), ("head", twin.head)]
    for name, module in modules:
        if isinstance(module, SKIPPED):
            pass
        elif isinstance(module, Square):
            layers.append(Layer("square"))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append(_affine_layer(module, tuple(probe.shape[1:])))
        else:
            raise ConfigError(f"model: layer '{name}' ({type(module).__name__}) cannot be evaluated under CKKS; "
                              "`medsec he` takes convolutions, linear layers and squares (model=he_cnn)")
        with torch.no_grad():
            probe = module(probe)
    if not layers or layers[0].kind != "affine":
        raise ConfigError("model: `medsec he` needs a convolution or linear layer first")
    first = layers[0]  # fold (x - mean) / std into the first affine map
    first.bias = first.bias - (mean / std) @ first.matrix
    first.matrix = first.matrix / std[:, None]
    last_affine = next(layer for layer in reversed(layers) if layer.kind == "affine")
    program = HEProgram(layers, shape, last_affine.matrix.shape[1])
    program.max_abs = 2.0 * _max_abs(program, calibration.reshape(len(calibration), -1).double().numpy())
    return program


def _affine_layer(module: nn.Conv2d | nn.Linear, in_shape: tuple[int, ...]) -> Layer:
    """A convolution or linear layer as a dense ``[in, out]`` matrix (its response to each input
    value, bias removed) and its bias per output."""
    size = int(np.prod(in_shape))
    with torch.no_grad():
        basis = torch.eye(size, dtype=torch.float64).reshape(size, *in_shape)
        zero = torch.zeros(1, *in_shape, dtype=torch.float64)
        bias = module(zero).reshape(-1)
        matrix = (module(basis).reshape(size, -1) - bias).numpy()
    return Layer("affine", matrix, bias.numpy())


def _max_abs(program: HEProgram, x: np.ndarray) -> float:
    """Largest magnitude of the input and of every layer's output on ``x``."""
    peak = float(np.abs(x).max())
    for layer in program.layers:
        x = layer.apply(x)
        peak = max(peak, float(np.abs(x).max()))
    return peak
