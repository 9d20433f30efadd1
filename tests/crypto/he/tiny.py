"""A tiny he_cnn (8x8 images, 2 channels, hidden 4), compiled once per test session."""
from __future__ import annotations

import functools

import torch

from medsec.crypto.he import HEProgram, compile_model
from medsec.models import he_cnn

SHAPE = (1, 8, 8)


@functools.lru_cache(maxsize=1)
def tiny() -> tuple[torch.nn.Module, HEProgram, torch.Tensor]:
    """(net, program, 8 images in [0, 1])."""
    torch.manual_seed(0)
    net = he_cnn(2, image_size=8, channels=2, kernel_size=2, stride=2, hidden=[4]).eval()
    images = torch.rand(8, *SHAPE)
    return net, compile_model(net, torch.rand(32, *SHAPE)), images
