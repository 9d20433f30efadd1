"""Networks: shapes for every backbone and channel count, local pretrained weights, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from medsec.errors import ConfigError
from medsec.models import densenet121, resnet, small_cnn
from medsec.models.classifiers import load_backbone_weights


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize(
    ("build", "size"),
    [(lambda **k: small_cnn(**k), 28), (lambda **k: resnet(depth=18, small_input=True, **k), 28),
     (lambda **k: resnet(depth=50, **k), 64), (lambda **k: densenet121(**k), 64)],
    ids=["small_cnn", "resnet18_28", "resnet50", "densenet121"],
)
def test_output_and_feature_shapes(build, size: int, in_channels: int) -> None:
    net = build(num_classes=5, in_channels=in_channels).eval()
    x = torch.rand(2, in_channels, size, size)
    with torch.no_grad():
        assert net(x).shape == (2, 5)
        assert net.features(x).shape == (2, net.head.in_features)


def test_small_cnn_3d() -> None:
    net = small_cnn(num_classes=3, spatial_dims=3, width=4).eval()
    assert net(torch.rand(2, 1, 16, 16, 16)).shape == (2, 3)


def test_2d_only_backbones_refuse_3d() -> None:
    with pytest.raises(ConfigError, match="2D only"):
        resnet(num_classes=2, spatial_dims=3)


def test_normalisation_is_inside_the_network() -> None:
    net = small_cnn(num_classes=2)
    assert float(net.mean) == 0.5 and float(net.std) == 0.25
    assert "mean" not in net.state_dict()  # derived, not a weight


def test_pretrained_torchvision_weights_from_a_local_file(tmp_path: Path) -> None:
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    net = resnet(num_classes=2, in_channels=1, depth=18)
    skipped = load_backbone_weights(net, path)
    assert skipped == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # a colour stem becomes a grey one by summing over RGB
    torch.testing.assert_close(net.backbone.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))


def test_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    net = small_cnn(num_classes=2)
    with pytest.raises(ConfigError, match="weights file not found: .*missing.pth"):
        load_backbone_weights(net, tmp_path / "missing.pth")
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no weights in .*other.pth fit"):
        load_backbone_weights(net, tmp_path / "other.pth")
