"""From a trained PyTorch classifier to a CKKS program: a list of affine and square layers.

The network's input normalisation is folded into the first layer, so the client encrypts the
pixels exactly as the data pipeline hands them to the network ([0, 1]); so is every other affine
module up to the first square (batch norm, pooling), and likewise between squares; a trained
polynomial activation ``a x^2 + b x`` is a square between two such runs. Every layer, a
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
from medsec.models.he_cnn import PolyAct, Square

SKIPPED = (nn.Flatten, nn.Dropout, nn.Identity)
"""Layers that do nothing at inference on a flat vector."""


class Elementwise(nn.Module):
    """``x * scale + offset`` (broadcast): the input normalisation, and the shift and scale that
    turn a square into a :class:`~medsec.models.PolyAct`."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


AFFINE = (Elementwise, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, *SKIPPED)
"""Layers that are affine maps at inference (batch norm in eval mode): fused into one layer."""


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
    """Compile ``net`` (a :func:`medsec.models.he_cnn` or :func:`medsec.models.he_cnn_deep`
    classifier) for images shaped like ``calibration`` ([n, C, H, W] in [0, 1]); the calibration
    images bound the values every layer produces (with a factor-2 margin). Each run of affine
    modules between squares (the input normalisation, convolutions, linear layers, batch norm in
    eval mode, average pooling, a polynomial activation's shift and scale) becomes one affine
    layer: one level of the CKKS chain.

    Raises:
        ConfigError: a layer that CKKS cannot evaluate (ReLU, max pooling, group norm ...), or
            a degenerate :class:`~medsec.models.PolyAct` (``a = 0``).
    """
    if not isinstance(net, Classifier) or not isinstance(net.backbone, nn.Sequential):
        raise ConfigError(f"model: `medsec he` needs model=he_cnn or he_cnn_deep (convolutions, linear layers and "
                          f"squares), got {type(net).__name__}")
    shape = tuple(calibration.shape[1:])
    if len(shape) != 3:
        raise ConfigError(f"data: `medsec he` needs 2D images [C, H, W], got {list(shape)}")
    twin = copy.deepcopy(net).double().eval()  # the caller's network stays as it is
    std = twin.std.reshape(-1, 1, 1)
    normalise = Elementwise(1 / std, -twin.mean.reshape(-1, 1, 1) / std)
    modules = [("normalise", normalise), *twin.backbone.named_children(), ("head", twin.head)]
    layers: list[Layer] = []
    probe = torch.zeros(1, *shape, dtype=torch.float64)  # tracks each module's input shape
    run: list[nn.Module] = []  # affine modules since the last square
    run_shape = shape
    for name, module in modules:
        if isinstance(module, (Square, PolyAct)):
            before, after = _square_form(name, module)
            layers += _fused([*run, *before], run_shape)
            layers.append(Layer("square"))
            run, run_shape = after, tuple(probe.shape[1:])
        elif isinstance(module, AFFINE):
            run_shape = run_shape if run else tuple(probe.shape[1:])
            run.append(module)
        else:
            raise ConfigError(f"model: layer '{name}' ({type(module).__name__}) cannot be evaluated under CKKS; "
                              "`medsec he` takes convolutions, linear layers, batch norm, average pooling, "
                              "squares and PolyAct (model=he_cnn or he_cnn_deep)")
        with torch.no_grad():
            probe = module(probe)
    layers += _fused(run, run_shape)  # the head: the last layer is always affine
    program = HEProgram(layers, shape, layers[-1].matrix.shape[1])
    program.max_abs = 2.0 * _max_abs(program, calibration.reshape(len(calibration), -1).double().numpy())
    return program


def _square_form(name: str, module: Square | PolyAct) -> tuple[list[nn.Module], list[nn.Module]]:
    """Affine modules before and after a plain square that together compute ``module``:
    ``a x^2 + b x = a (x + s)^2 - a s^2`` with ``s = b / 2a``."""
    if isinstance(module, Square):
        return [], []
    a, b = module.a.detach(), module.b.detach()
    if a == 0:
        raise ConfigError(f"model: activation '{name}' has a = 0 (a linear map); CKKS needs its square term")
    shift = b / (2 * a)
    return [Elementwise(torch.ones_like(a), shift)], [Elementwise(a, -a * shift ** 2)]


def _fused(run: list[nn.Module], in_shape: tuple[int, ...]) -> list[Layer]:
    """The affine ``run`` of modules as one layer, or none if it only reshapes (flatten, dropout)."""
    if all(isinstance(module, SKIPPED) for module in run):
        return []
    return [_affine_layer(nn.Sequential(*run), in_shape)]


def _affine_layer(module: nn.Module, in_shape: tuple[int, ...]) -> Layer:
    """An affine module as a dense ``[in, out]`` matrix (its response to each input value, bias
    removed) and its bias per output. Outputs an input value cannot reach stay exactly zero."""
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
