"""Detection metrics on a hand-built case whose AP and FROC are worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsec.analysis.detection_metrics import FROC, DetectionMetrics, match_image
from medsec.viz.detection import froc_png

T = torch.tensor


def hand_built(dims: int = 2) -> tuple[list[dict], list[dict]]:
    """Image A: lesions at (0-10) and (20-30); detections there (0.9, 0.7) and a false one (0.8).
    Image B: one lesion at (0-10), missed; a false detection (0.6). In score order: TP, FP, TP, FP.
    One class-1 lesion in image B is detected as class 0: wrong class, so missed too."""
    def box(lo: float, hi: float) -> list[float]:
        return [lo] * dims + [hi] * dims

    preds = [{"boxes": T([box(0, 10), box(50, 60), box(20, 30)]), "scores": T([0.9, 0.8, 0.7]), "labels": T([0, 0, 0])},
             {"boxes": T([box(40, 50), box(70, 80)]), "scores": T([0.6, 0.5]), "labels": T([0, 0])}]
    targets = [{"boxes": T([box(0, 10), box(20, 30)]), "labels": T([0, 0])},
               {"boxes": T([box(0, 10), box(70, 80)]), "labels": T([0, 1])}]
    return preds, targets


# Score order over both images: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP, 0.5 FP (wrong class); 4 lesions, 2 images.
# FP/image and sensitivity after each: (0, 1/4), (0.5, 1/4), (0.5, 2/4), (1, 2/4), (1.5, 2/4).
SENSITIVITY = {0.05: 0.25, 0.1: 0.25, 0.2: 0.25, 0.5: 0.5, 1.0: 0.5, 2.0: 0.5, 4.0: 0.5, 8.0: 0.5}


def class0_ap() -> float:
    """COCO AP of class 0 alone: 3 lesions; in score order TP, FP, TP, FP, FP -> recall 1/3 at
    precision 1, 2/3 at precision 2/3; of COCO's 101 recall points, 0 .. 0.33 (34) have
    interpolated precision 1, 0.34 .. 0.66 (33) have 2/3, the rest 0."""
    return (34 + 33 * 2 / 3) / 101


def test_match_is_greedy_by_score_and_class_aware() -> None:
    pred = {"boxes": T([[0, 0, 10, 10.], [0, 0, 10, 9], [0, 0, 10, 10]]), "scores": T([0.5, 0.9, 0.7]),
            "labels": T([0, 0, 1])}
    target = {"boxes": T([[0, 0, 10, 10.]]), "labels": T([0])}
    # score order: 0.9 (class 0, IoU 0.9: hit), 0.7 (class 1: miss), 0.5 (the lesion is taken: miss)
    assert match_image(pred, target).tolist() == [True, False, False]


def test_froc_values_are_exact() -> None:
    preds, targets = hand_built()
    froc = FROC()
    froc.update(preds, targets)
    fppi, sensitivity, thresholds = froc.curve()
    np.testing.assert_allclose(fppi, [0, 0.5, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(sensitivity, [0.25, 0.25, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6, 0.5])
    assert froc.sensitivity_at(list(SENSITIVITY)) == SENSITIVITY
    values = froc.compute()
    assert values["froc_0_05"] == 0.25 and values["froc_0_5"] == 0.5 and values["froc_8"] == 0.5
    assert values["froc_chestx_det10"] == 0.25
    assert values["froc_cpm"] == pytest.approx((2 * 0.25 + 5 * 0.5) / 7)  # 0.125, 0.25 | 0.5 .. 8
    assert values["froc_mean"] == pytest.approx((3 * 0.25 + 5 * 0.5) / 8)


def test_froc_counts_tied_scores_together() -> None:
    pred = {"boxes": T([[0, 0, 10, 10.], [50, 50, 60, 60]]), "scores": T([0.5, 0.5]), "labels": T([0, 0])}
    froc = FROC()
    froc.update([pred], [{"boxes": T([[0, 0, 10, 10.]]), "labels": T([0])}])
    # one threshold: the hit and the false positive arrive together (1 FP/image), never sensitivity 1 at 0 FPs
    assert froc.sensitivity_at([0.5, 1.0]) == {0.5: 0.0, 1.0: 1.0}


def test_froc_without_lesions_is_undefined() -> None:
    froc = FROC()
    froc.update([{"boxes": T([[0, 0, 1, 1.]]), "scores": T([0.9]), "labels": T([0])}],
                [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert all(math.isnan(v) for v in froc.compute().values())


@pytest.mark.parametrize("dims", [2, 3])
def test_map_per_class_ap_and_froc_are_exact(dims: int) -> None:
    preds, targets = hand_built(dims)
    metrics = DetectionMetrics(["disc", "ring"], spatial_dims=dims)
    metrics.update(preds, targets)
    values = metrics.compute()
    # every hit has IoU 1, so AP is the same at every IoU threshold
    assert values["ap50_disc"] == pytest.approx(class0_ap(), abs=1e-6)
    assert values["ap_disc"] == pytest.approx(class0_ap(), abs=1e-6)
    assert values["ap50_ring"] == pytest.approx(0.0, abs=1e-9)  # its one lesion was never found
    assert values["map_50"] == pytest.approx(class0_ap() / 2, abs=1e-6)  # mean over the two classes
    assert values["map"] == pytest.approx(class0_ap() / 2, abs=1e-6)
    assert values["froc_0_1"] == 0.25 and values["froc_1"] == 0.5
    assert values["mean_iou"] == pytest.approx(0.5)  # 1, 1, 0, 0 (the class-1 lesion's overlap has the wrong class)


def test_class_without_ground_truth_is_nan() -> None:
    metrics = DetectionMetrics(["disc", "ring"])
    metrics.update([{"boxes": T([[0, 0, 10, 10.]]), "scores": T([0.9]), "labels": T([0])}],
                   [{"boxes": T([[0, 0, 10, 10.]]), "labels": T([0])}])
    values = metrics.compute()
    assert values["ap50_disc"] == pytest.approx(1.0) and math.isnan(values["ap50_ring"])
    assert values["map_50"] == pytest.approx(1.0)


def test_froc_png_is_a_png() -> None:
    preds, targets = hand_built()
    froc = FROC()
    froc.update(preds, targets)
    assert froc_png(froc).startswith(b"\x89PNG")


def test_synced_metrics_count_each_image_once(tmp_path) -> None:
    import torch.distributed as dist

    preds, targets = hand_built()
    alone = DetectionMetrics(["disc", "ring"])
    alone.update(preds, targets, ["a", "b"])
    assert alone.synced() is alone  # outside DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        padded = DetectionMetrics(["disc", "ring"])
        padded.update(preds + preds[:1], targets + targets[:1], ["a", "b", "a"])  # the sampler repeated image a
        assert padded.synced().compute() == pytest.approx(alone.compute(), nan_ok=True)
        assert padded.compute()["froc_0_05"] != alone.compute()["froc_0_05"]  # unsynced, a counts twice
    finally:
        dist.destroy_process_group()
