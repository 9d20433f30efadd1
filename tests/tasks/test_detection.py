"""DetectionTask pieces: the detectors' interface, learning on a tiny batch, configs, outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medsec.data.detection import pack_boxes, unpack_boxes
from medsec.errors import ConfigError, user_error_message
from medsec.tasks import DetectionTask
from medsec.utils.config import REPO_ROOT
from medsec.utils.outputs import OutputWriter

TINY = {"net": {"_target_": "medsec.models.detectors.torchvision_detector", "architecture": "fasterrcnn_resnet_fpn",
                "backbone": "resnet18", "returned_layers": [2, 3], "fpn_channels": 16, "representation_size": 32,
                "anchor_sizes": [[8], [16], [32]], "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32,
                "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 20}}
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.002}


def make(in_channels: int = 1, **kwargs) -> DetectionTask:
    return DetectionTask(model=TINY, num_classes=2, class_names=["disc", "ring"], optimizer=OPT,
                         in_channels=in_channels, **kwargs)


def tiny_batch(n: int = 4, size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares (class 0) and dim ones (class 1) on a dark background, with their boxes."""
    generator = np.random.default_rng(0)
    images = np.full((n, channels, size, size), 0.1, dtype=np.float32)
    packed = []
    for i in range(n):
        r, c = generator.integers(2, size - 14, 2)
        images[i, :, r:r + 12, c:c + 12] = 0.9 if i % 2 == 0 else 0.5
        packed.append(pack_boxes(np.asarray([[r, c, r + 12, c + 12]], np.float32), [i % 2], 4))
    return torch.as_tensor(images), torch.as_tensor(np.stack(packed))


@pytest.mark.parametrize("channels", [1, 3])
def test_detector_interface(channels: int) -> None:
    torch.manual_seed(0)
    task = make(in_channels=channels)
    images, packed = tiny_batch(channels=channels)
    task.eval()
    detections = task(images)
    assert len(detections) == 4 and set(detections[0]) == {"boxes", "scores", "labels"}
    assert detections[0]["boxes"].shape[1] == 4
    loss, parts = task.detection_loss(images, packed)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} == set(parts)
    assert not task.training  # computing losses left evaluation mode alone


def test_evaluation_losses_keep_batch_norm_statistics() -> None:
    task = make()
    task.eval()
    before = {k: v.clone() for k, v in task.state_dict().items() if "running_mean" in k}
    task.detection_loss(*tiny_batch())
    after = {k: v for k, v in task.state_dict().items() if "running_mean" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)


def test_loss_decreases_and_boxes_are_found_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    task = make()
    images, packed = tiny_batch()
    optimizer = torch.optim.Adam(task.parameters(), lr=0.002)
    task.train()
    losses = []
    for _ in range(40):
        loss, _ = task.detection_loss(images, packed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    task.eval()
    with torch.no_grad():
        detections = task(images)
    truth = unpack_boxes(packed)
    from monai.data.box_utils import box_iou

    best = [float(torch.as_tensor(box_iou(t["boxes"], d["boxes"][:1])).max()) if len(d["boxes"]) else 0.0
            for t, d in zip(truth, detections)]
    assert np.mean(best) > 0.5, best


@pytest.mark.parametrize(("net", "extra", "message"), [
    ({"architecture": "yolo"}, {}, "architecture must be one of"),
    ({"anchor_sizes": [[8], [16]]}, {}, "anchor_sizes: 2 lists for a backbone with 3 feature maps"),
    ({}, {"spatial_dims": 3}, "torchvision detectors are 2D"),
])
def test_bad_configs_are_config_errors(net: dict, extra: dict, message: str) -> None:
    with pytest.raises(Exception) as info:  # Hydra wraps what the target raises
        DetectionTask(model={"net": {**TINY["net"], **net}}, num_classes=1, optimizer=OPT, **extra)
    assert message in (user_error_message(info.value) or "")


def test_class_names_must_fit() -> None:
    with pytest.raises(ConfigError, match="2 class names for 1 classes"):
        DetectionTask(model=TINY, num_classes=1, optimizer=OPT, class_names=["a", "b"])


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet", "fasterrcnn_resnet50", "retinanet", "fasterrcnn_resnet18"])
def test_model_configs_build_and_detect(name: str) -> None:
    model = yaml.safe_load((REPO_ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    task = DetectionTask(model=model, num_classes=2, optimizer=OPT, in_channels=1)
    images, packed = tiny_batch(n=2, size=64)
    task.eval()
    with torch.no_grad():
        assert len(task(images)) == 2
        loss, _ = task.detection_loss(images, packed)
    assert torch.isfinite(loss)


def test_outputs(tmp_path: Path) -> None:
    task = make(num_overlays=1)
    task.eval()
    task.on_test_epoch_start()
    images, packed = tiny_batch(n=2)
    with torch.no_grad():
        task.test_step({"image": images, "label": packed, "id": ["a", "b"]}, 0)
    # a known detection on image a
    task.test_rows[0].update(boxes=np.asarray([[2.0, 3.0, 12.0, 15.0]]), scores=np.asarray([0.75]),
                             labels=np.asarray([1]))
    task.test_rows[1].update(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, dtype=int))
    task.save_test_outputs(tmp_path, OutputWriter(tmp_path))
    detections = json.loads((tmp_path / "detections.json").read_text())["detections"]
    assert detections == [{"image_id": "a", "category_id": 1, "category": "ring", "score": 0.75,
                           "bbox": [3.0, 2.0, 12.0, 10.0]}]
    lines = (tmp_path / "detections.csv").read_text().splitlines()
    assert lines == ["image,class,category_id,score,x,y,w,h", "a,ring,1,0.75,3.0,2.0,12.0,10.0"]
    assert (tmp_path / "plots" / "froc.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == ["a.png"]
