"""Image classifiers as ``normalise -> backbone -> head`` so that heads can be swapped and
backbones frozen. Inputs are images in [0, 1]; each network normalises internally, so attacks
and defences can work in pixel space."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from medsec.errors import ConfigError


class Classifier(nn.Module):
    """``head(backbone((x - mean) / std))``; ``features`` exposes the backbone's output."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.25,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("mean", _channel_stat(mean), persistent=False)
        self.register_buffer("std", _channel_stat(std), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.reshape(1, -1, *([1] * (x.ndim - 2)))
        std = self.std.reshape(1, -1, *([1] * (x.ndim - 2)))
        return self.backbone((x - mean) / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _channel_stat(value: float | Sequence[float]) -> torch.Tensor:
    return torch.as_tensor([value] if isinstance(value, (int, float)) else list(value), dtype=torch.float32)


def small_cnn(
    num_classes: int, in_channels: int = 1, spatial_dims: int = 2, width: int = 32, dropout: float = 0.1
) -> Classifier:
    """A compact CNN for 28x28-64x64 images (2D or 3D): three conv blocks and global pooling."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    gap = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)]

    w = width
    backbone = nn.Sequential(
        *block(in_channels, w), *block(w, w), pool(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), pool(2),
        *block(2 * w, 4 * w), gap(1), nn.Flatten(), nn.Dropout(dropout),
    )
    return Classifier(backbone, 4 * w, num_classes)


class _BasicBlock(BasicBlock):
    """torchvision's block with the residual added out of place: the in-place ``out += identity``
    modifies a tensor that per-sample gradient hooks (Opacus, DP-SGD) must keep intact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(Bottleneck):
    """:class:`_BasicBlock`'s change for the three-convolution block (ResNet-50)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class _DenseNet(tvm.DenseNet):
    """torchvision's DenseNet with the final ReLU out of place (same weights and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def resnet(
    num_classes: int,
    in_channels: int = 1,
    spatial_dims: int = 2,
    depth: int = 18,
    small_input: bool = False,
) -> Classifier:
    """torchvision ResNet-18/50. ``small_input`` uses a 3x3 stride-1 stem without max-pooling
    (the MedMNIST "ResNet (28)" setting) so 28x28 images keep their resolution."""
    _require_2d("resnet", spatial_dims)
    layouts = {18: (_BasicBlock, [2, 2, 2, 2]), 34: (_BasicBlock, [3, 4, 6, 3]), 50: (_Bottleneck, [3, 4, 6, 3])}
    if depth not in layouts:
        raise ConfigError(f"model.net.depth must be one of {sorted(layouts)}, got {depth}")
    net = tvm.ResNet(*layouts[depth])
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = _adapt_conv(net.conv1, in_channels)
    return Classifier(net, feature_dim, num_classes)


def densenet121(num_classes: int, in_channels: int = 1, spatial_dims: int = 2) -> Classifier:
    """torchvision DenseNet-121, the CheXNet backbone."""
    _require_2d("densenet121", spatial_dims)
    net = _DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    feature_dim = net.classifier.in_features
    net.classifier = nn.Identity()
    net.features.conv0 = _adapt_conv(net.features.conv0, in_channels)
    return Classifier(net, feature_dim, num_classes)


def _require_2d(name: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ConfigError(f"model '{name}' is 2D only; use model=small_cnn for {spatial_dims}D data")


def _adapt_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs (kept as is for 3)."""
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


def load_backbone_weights(model: Classifier, path: str | Path) -> list[str]:
    """Load a local state dict (torchvision ImageNet file or our own) into ``model.backbone``.

    Keys that do not fit (classifier layers, a stem with another channel count) are skipped; a
    3-channel stem is summed over colour for a 1-channel model. Returns the skipped keys.
    No download ever happens here.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = model.backbone.state_dict()
    loadable, skipped = {}, []
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        target = own.get(key)
        if target is None:
            skipped.append(key)
        elif target.shape == value.shape:
            loadable[key] = value
        elif value.ndim == 4 and target.shape[1] == 1 and value.shape[1] == 3 and value.shape[2:] == target.shape[2:]:
            loadable[key] = value.sum(1, keepdim=True)
        else:
            skipped.append(key)
    if not loadable:
        raise ConfigError(f"model.pretrained: no weights in {path} fit the backbone")
    model.backbone.load_state_dict(loadable, strict=False)
    return skipped
