"""SegmentationTask pieces: network shapes, learning, metric names and values, NIfTI outputs."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import DataLoader

from medsec.core.registry import register
from medsec.errors import ConfigError, DataError
from medsec.tasks import SegmentationTask
from medsec.tasks.segmentation import voxel_spacing
from medsec.utils.outputs import OutputWriter

UNET = {"net": {"_target_": "monai.networks.nets.UNet", "channels": [4, 8], "strides": [2], "num_res_units": 0}}
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01}


class Oracle(nn.Module):
    """A "network" whose input is the label map itself: returns confident one-hot logits of it."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * one_hot(x[:, :1].round().long(), self.out_channels) - 10


def make(model: dict = UNET, **kwargs) -> SegmentationTask:
    args = {"num_classes": 2, "class_names": ["Anterior", "Posterior"], "spatial_dims": 2, "roi_size": 16, **kwargs}
    return SegmentationTask(model=model, optimizer=OPT, **args)


@pytest.mark.parametrize("dims", [2, 3])
def test_output_has_a_channel_per_class_plus_background(dims: int) -> None:
    task = make(spatial_dims=dims, in_channels=2, multilabel=True, class_counts=None)
    x = torch.rand(2, 2, *([16] * dims))
    assert task(x).shape == (2, 3, *([16] * dims))
    whole = torch.rand(1, 2, *([20] * dims))  # not a multiple of the window: sliding windows cover it
    assert task.infer(whole).shape == (1, 3, *([20] * dims))


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    task = make()
    label = torch.zeros(4, 1, 16, 16, dtype=torch.long)
    label[:, :, 3:8, 3:8], label[:, :, 9:14, 9:14] = 1, 2
    image = label.float() / 2 + 0.1 * torch.randn(4, 1, 16, 16)
    optimizer = torch.optim.Adam(task.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = task.loss_fn(task(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_class_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="1 class names for 2 foreground classes"):
        make(class_names=["a"])
    with pytest.raises(ConfigError, match="distinct metric names"):
        make(class_names=["Left lobe", "left-lobe"])
    assert make(class_names=None).class_names == ["1", "2"]


def _loader(labels: torch.Tensor, affine: torch.Tensor) -> DataLoader:
    cases = [{"image": label.float(), "label": label, "affine": affine, "id": f"case_{i}"}
             for i, label in enumerate(labels)]
    return DataLoader(cases, batch_size=1)


def test_perfect_prediction_scores_dice_one_and_saves_niftis(tmp_path: Path) -> None:
    labels = torch.zeros(3, 1, 12, 12, 8, dtype=torch.long)
    labels[:, :, 2:6, 2:6, 2:5] = 1
    labels[:2, :, 7:10, 6:11, 3:7] = 2  # the last case has no class 2: left out of its mean
    affine = torch.tensor([[0.0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1]], dtype=torch.float64)
    register("network", "tests.tasks.test_segmentation.Oracle")  # a network from outside medsec
    task = make(model={"net": {"_target_": "tests.tasks.test_segmentation.Oracle"}}, spatial_dims=3,
                roi_size=[8, 8, 8], num_overlays=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(task, dataloaders=_loader(labels, affine), verbose=False)[0]
    expected = {"test/loss", "test/dice_anterior", "test/dice_posterior", "test/dice_mean",
                "test/hd95_mm_anterior", "test/hd95_mm_posterior", "test/hd95_mm_mean"}
    assert set(metrics) == expected
    for name in ("anterior", "posterior", "mean"):
        assert metrics[f"test/dice_{name}"] == pytest.approx(1.0)
        assert metrics[f"test/hd95_mm_{name}"] == pytest.approx(0.0)

    task.save_test_outputs(tmp_path, OutputWriter(tmp_path))
    for i in range(3):
        saved = nib.load(tmp_path / "predictions" / f"case_{i}.nii.gz")
        np.testing.assert_allclose(saved.affine, affine.numpy())
        np.testing.assert_array_equal(np.asarray(saved.dataobj), labels[i, 0].numpy())
    overlays = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert overlays == ["case_0.png", "case_1.png"]
    assert (tmp_path / "overlays" / "case_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ANISOTROPIC = torch.tensor([[0.0, -1, 0, 4], [0.8, 0, 0, -2], [0, 0, 3, 7], [0, 0, 0, 1]], dtype=torch.float64)
"""A rotated affine whose voxels are 0.8 x 1 x 3 mm (the lengths of its columns, not its diagonal)."""


def test_hd95_is_in_millimetres_of_each_images_spacing() -> None:
    """Two classes, each predicted as a shifted copy of its ground truth, so that every surface
    distance is known: class 1, a 3x3x1 slab two slices off, is 2 x 3 mm = 6 mm away everywhere;
    class 2, a 2x2x2 cube three voxels off along the first axis, has surface distances of 2 and 3
    voxels of 0.8 mm: their 95th percentile is 3 x 0.8 = 2.4 mm (in voxels the two would be 2 and 3)."""
    target = torch.zeros(1, 1, 14, 12, 10, dtype=torch.long)
    prediction = torch.zeros_like(target)
    target[..., 2:5, 2:5, 2], prediction[..., 2:5, 2:5, 4] = 1, 1
    target[..., 5:7, 7:9, 6:8], prediction[..., 8:10, 7:9, 6:8] = 2, 2
    register("network", "tests.tasks.test_segmentation.Oracle")
    task = make(model={"net": {"_target_": "tests.tasks.test_segmentation.Oracle"}}, spatial_dims=3,
                roi_size=[14, 12, 10])
    batch = [{"image": prediction[0].float(), "label": target[0], "affine": ANISOTROPIC, "id": "case_0"}]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(task, dataloaders=DataLoader(batch, batch_size=1), verbose=False)[0]
    assert metrics["test/hd95_mm_anterior"] == pytest.approx(6.0)
    assert metrics["test/hd95_mm_posterior"] == pytest.approx(2.4)
    assert metrics["test/hd95_mm_mean"] == pytest.approx(4.2)


def test_degenerate_spacing_is_refused_naming_the_case() -> None:
    assert voxel_spacing(ANISOTROPIC, 3, "a") == pytest.approx([0.8, 1.0, 3.0])
    assert voxel_spacing(torch.eye(4), 2, "b") == [1.0, 1.0]  # no geometry (synthetic, PNG): 1 mm per pixel
    flat = ANISOTROPIC.clone()
    flat[:, 2] = 0
    with pytest.raises(DataError, match=r"case scan_7: its affine gives voxel spacing \[0\.8.*, 1\.0, 0\.0\]"):
        voxel_spacing(flat, 3, "scan_7")


def test_dice_counts_each_class_over_cases_that_have_it() -> None:
    task = make()
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, :4] = 1
    target[0, :, 6:] = 2  # class 2 only in case 0
    prediction = target.clone()
    prediction[0, :, 6:, :4] = 0  # half of case 0's class 2 missed: Dice 2/3
    task.val_dice(one_hot(prediction, 3), one_hot(target, 3))
    values = task._per_class(task.val_dice, "dice")
    assert values["dice_anterior"] == pytest.approx(1.0)
    assert values["dice_posterior"] == pytest.approx(2 / 3)
    assert values["dice_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert task._per_class(task.val_dice, "dice") == {}  # reset after reading
    assert not math.isnan(values["dice_mean"])


def test_writer_is_used_for_every_output(tmp_path: Path) -> None:
    """Per-case outputs go through the writer (which may encrypt), never straight to disk."""

    class Recording(OutputWriter):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.names: list[str] = []

        def write(self, name: str, data: bytes) -> Path:
            self.names.append(name)
            return self.root / name

    task = make()
    task.test_cases = [{"id": "a", "prediction": np.zeros((1, 4, 4), np.uint8), "affine": np.eye(4),
                        "image": np.zeros((1, 4, 4), np.float32), "label": np.zeros((1, 4, 4), np.uint8)}]
    writer = Recording(tmp_path)
    task.save_test_outputs(tmp_path, writer)
    assert writer.names == ["predictions/a.nii.gz", "overlays/a.png"]
    assert not any(tmp_path.iterdir())
