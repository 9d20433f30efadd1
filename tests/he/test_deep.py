"""The deeper HE-friendly CNN (he_cnn_deep): affine modules fused into one layer per level, the
compiled program equal to PyTorch, and its encrypted evaluation equal to plaintext in both modes."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from medsec.errors import ConfigError
from medsec.he import HEClient, HEProgram, HEServer, compile_model
from medsec.models import Classifier, PolyAct, Square, he_cnn_deep

PRECISION = 12
TOLERANCE = 2.0 ** -(PRECISION - 4)
"""Largest accepted |encrypted - plaintext| logit, as in test_he.py."""
BLOCKS = [{"channels": 2, "kernel_size": 3, "stride": 1, "pool": 2}, {"channels": 3, "kernel_size": 2}]
"""8x8 -> conv 2x3x3 -> 6x6 -> pool -> 3x3 -> conv 3x2x2 -> 2x2: 12 features."""


def _settle(net: nn.Module) -> None:
    """Random batch-norm statistics and affine parameters, and polynomial coefficients, so that
    no module is an identity."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        elif isinstance(module, PolyAct):
            module.a.data.uniform_(0.1, 0.3)
            module.b.data.uniform_(0.3, 0.7)


@functools.lru_cache(maxsize=3)
def tiny_deep(hidden: tuple[int, ...] = (), activation: str = "poly") -> tuple[nn.Module, HEProgram, torch.Tensor]:
    """A tiny he_cnn_deep (8x8 images, two conv blocks, ``hidden`` linear layers) in eval mode, its
    compiled program and 8 images in [0, 1]."""
    torch.manual_seed(0)
    net = he_cnn_deep(2, image_size=8, blocks=BLOCKS, hidden=hidden, dropout=0.2, activation=activation)
    _settle(net)
    net.eval()
    images = torch.rand(8, 1, 8, 8)
    return net, compile_model(net, torch.rand(32, 1, 8, 8)), images


def test_fusion_makes_one_layer_per_run_of_affine_modules() -> None:
    net, program, _ = tiny_deep()
    # normalise+conv+bn+shift | square | scale+pool+conv+bn+shift | square | scale+flatten+dropout+head
    assert [layer.kind for layer in program.layers] == ["affine", "square"] * 2 + ["affine"]
    assert program.depth == 5 and len(net.backbone) + 1 == 10  # 10 modules in the network
    assert program.widths == [72, 12, 2]
    net, program, _ = tiny_deep((4,))  # + flatten+linear+bn | square
    assert program.depth == 7 and program.widths == [72, 12, 4, 2]


@pytest.mark.parametrize(("hidden", "activation"), [((), "poly"), ((4,), "poly"), ((4,), "square")])
def test_compiled_deep_program_equals_pytorch(hidden: tuple[int, ...], activation: str) -> None:
    net, program, images = tiny_deep(hidden, activation)
    with torch.no_grad():
        expected = copy.deepcopy(net).double()(images.double()).numpy()
    got = program.forward(images.reshape(len(images), -1).double().numpy())
    assert np.abs(got - expected).max() < 1e-9 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_encrypted_deep_model_matches_plaintext(mode: str) -> None:
    _, program, images = tiny_deep()
    images = images if mode == "throughput" else images[:1]
    client = HEClient(program.card(PRECISION), mode)
    server = HEServer(program, client.public_context())
    logits = client.decrypt(server.evaluate(mode, client.encrypt(images.numpy())), len(images))
    expected = program.forward(images.reshape(len(images), -1).double().numpy())
    assert np.abs(logits - expected).max() < TOLERANCE
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_non_affine_layers_are_still_refused() -> None:
    net = Classifier(nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), Square(), nn.MaxPool2d(2), nn.Flatten()),
                     18, 2).eval()
    with pytest.raises(ConfigError, match=r"layer '3' \(MaxPool2d\) cannot be evaluated under CKKS"):
        compile_model(net, torch.rand(2, 1, 7, 7))


def test_a_linear_activation_is_refused() -> None:
    net = he_cnn_deep(2, image_size=8, blocks=BLOCKS[:1], hidden=()).eval()
    net.backbone[2].a.data.zero_()
    with pytest.raises(ConfigError, match="activation '2' has a = 0"):
        compile_model(net, torch.rand(2, 1, 8, 8))


def test_blocks_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"blocks\[0\]: needs channels and kernel_size"):
        he_cnn_deep(2, blocks=[{"channels": 2, "kernel": 3}])
    with pytest.raises(ConfigError, match="activation must be one of"):
        he_cnn_deep(2, activation="relu")
    with pytest.raises(ConfigError, match="do not fit image_size 8"):
        he_cnn_deep(2, image_size=8, blocks=[{"channels": 2, "kernel_size": 9}])
