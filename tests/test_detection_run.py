"""`medsec train task=detection` / `medsec eval` end to end on tiny synthetic data, plus the NIH
sample's boxes through the whole pipeline (skips without ../shared/data)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_verb

QUIET = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
TINY_NET = ["model.net.fpn_channels=16", "model.net.representation_size=32", "model.net.anchor_sizes=[[8],[16],[32]]"]
SYNTHETIC = ["experiment=synthetic_detection", "data.source.num_samples=[32,8,8]", "data.source.image_size=32",
             "data.batch_size=8", "trainer.max_epochs=2", *TINY_NET, *QUIET]
KEYS = {"train/loss", "val/map_50", "val/map_50_best", "test/map", "test/map_50", "test/map_75", "test/mar_100",
        "test/ap_disc", "test/ap50_ring", "test/froc_0_05", "test/froc_8", "test/froc_chestx_det10", "test/froc_cpm",
        "test/froc_mean", "test/mean_iou"}


def test_synthetic_train_then_eval(tmp_path: Path) -> None:
    metrics = run_verb("train", SYNTHETIC, tmp_path / "train")
    assert KEYS <= set(metrics)
    assert read_metrics(tmp_path / "train") == metrics
    assert 0.0 <= metrics["test/froc_8"] <= 1.0
    run = tmp_path / "train"
    detections = json.loads((run / "detections.json").read_text())
    assert detections["categories"] == ["disc", "ring"]
    assert {d["image_id"] for d in detections["detections"]} <= {f"synthetic-test-{i:06d}" for i in range(8)}
    assert (run / "detections.csv").read_text().startswith("image,class,category_id,score")
    assert (run / "plots" / "froc.png").is_file()
    assert len(list((run / "overlays").glob("*.png"))) == 4

    ckpt = run / "checkpoints" / "best.ckpt"
    evaluated = run_verb("eval", [f"ckpt_path={ckpt}", "callbacks.rich_progress_bar=null"], tmp_path / "eval")
    for key in ("test/map", "test/map_50", "test/froc_mean", "test/mean_iou"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6, nan_ok=True), key
    assert (tmp_path / "eval" / "detections.csv").read_text() == (run / "detections.csv").read_text()


def test_nih_sample_boxes_train(tmp_path: Path) -> None:
    from tests.data.fakes import shared_data

    root = shared_data("nih_cxr14_sample")
    overrides = ["task=detection", "model=fasterrcnn_resnet18", "data=nih_boxes", f"data.source.root={root}",
                 "data.image_size=64", "trainer.max_epochs=1", *TINY_NET, *QUIET]
    metrics = run_verb("train", overrides, tmp_path)
    assert {"test/map_50", "test/froc_mean", "test/ap50_nodule"} <= set(metrics)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic detection run the attack and privacy tests start from."""
    out = tmp_path_factory.mktemp("detection")
    run_verb("train", SYNTHETIC, out)
    return out


def test_pgd_vanishing_attack_reports_map_under_attack(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "best.ckpt"
    report = run_verb("attack", [f"ckpt_path={ckpt}", "attack=pgd", "attack.eps=[1/255,8/255]", "attack.steps=2",
                                 "max_images=8", "train_images=8"], tmp_path)
    assert report["kind"] == "detection"
    rows = {row["eps"]: row for row in report["rows"]}
    assert all(row["metric"] == "map_50" for row in rows.values())
    metrics = read_metrics(trained)
    assert rows[8 / 255]["clean"] == pytest.approx(metrics["test/map_50"], abs=1e-6)  # the same 8 test images
    assert rows[8 / 255]["linf"] <= 8 / 255 + 1e-6
    assert json.loads((tmp_path / "robustness.json").read_text())["rows"][1]["metric"] == "map_50"


def test_perceptual_encryption_trains_a_detector(tmp_path: Path) -> None:
    from medsec.protections import SecretKey
    from medsec.protections.keys import write_key_file

    key_file = write_key_file(tmp_path / "keys" / "site.key", SecretKey(bytes(range(7, 39))))
    metrics = run_verb("train", [*SYNTHETIC, "protect=[perceptual]", f"protect.perceptual.key.file={key_file}",
                                 "protect.perceptual.block_size=8"], tmp_path / "run")
    assert KEYS <= set(metrics)


@pytest.mark.slow
def test_aes_store_gives_the_plain_figures_exactly(trained: Path, tmp_path: Path) -> None:
    refs = [f"crypto.key.file={tmp_path / 'keys' / 'site.key'}", f"paths.store_dir={tmp_path / 'stores'}"]
    data = ["data=synthetic_det", "data.source.num_samples=[32,8,8]", "data.source.image_size=32"]
    run_verb("encrypt", ["action=keygen", *refs], tmp_path / "keygen")
    run_verb("encrypt", [*data, *refs], tmp_path / "encrypt")
    sealed = run_verb("train", [*SYNTHETIC, "protect=[aes]", f"protect.aes.key.file={tmp_path / 'keys' / 'site.key'}",
                                refs[1]], tmp_path / "sealed")
    plain = read_metrics(trained)
    for name in ("test/map", "test/map_50", "test/froc_mean", "test/mean_iou", "val/map_50_best"):
        assert sealed[name] == pytest.approx(plain[name], abs=1e-6, nan_ok=True), name


RETINA_3D = ["task=detection", "model=retinanet_monai", "model.net.widths=[8,16,32,64]", "model.net.fpn_channels=16",
             "trainer.max_epochs=1", *QUIET]


def test_synthetic_3d_with_monai_retinanet(tmp_path: Path) -> None:
    overrides = ["data=synthetic_det", "data.source.spatial_dims=3", "data.source.image_size=16",
                 "data.source.num_samples=[8,4,4]", "data.batch_size=4", "model.net.anchor_shapes=[[4,4,4],[6,6,6]]",
                 *RETINA_3D]
    metrics = run_verb("train", overrides, tmp_path)
    assert KEYS <= set(metrics)
    detections = json.loads((tmp_path / "detections.json").read_text())["detections"]
    assert all(len(d["box"]) == 6 for d in detections)
    assert (tmp_path / "detections.csv").read_text().startswith("image,class,category_id,score,min_0,min_1,min_2")


def test_boxes_from_a_decathlon_label_map(tmp_path: Path) -> None:
    from tests.data.fakes import write_decathlon

    root = write_decathlon(tmp_path / "Task99_Fake", cases=10)
    overrides = ["data=decathlon_boxes", f"data.source.root={root}", "data.image_size=[16,16,8]",
                 "model.net.anchor_shapes=[[4,4,2],[6,6,4]]", *RETINA_3D]
    metrics = run_verb("train", overrides, tmp_path / "run")
    assert {"test/ap50_anterior", "test/ap50_posterior", "test/mean_iou"} <= set(metrics)


def test_predict_writes_detections_on_the_input_grid(trained: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    inputs = tmp_path / "scans"
    inputs.mkdir()
    for k in range(2):
        pixels = np.full((40, 48), 60, dtype=np.uint8)
        pixels[8 + k:20 + k, 10:22] = 200
        Image.fromarray(pixels).save(inputs / f"scan{k}.png")
    result = run_verb("predict", [f"ckpt_path={trained / 'checkpoints' / 'best.ckpt'}", f"input={inputs}"],
                      tmp_path / "predict")
    assert result["problem"] == "detection" and result["files"] == ["detections.csv"]
    lines = (tmp_path / "predict" / "detections.csv").read_text().splitlines()
    assert lines[0] == "id,class,score,x,y,w,h"
    for line in lines[1:]:
        _, name, score, x, y, w, h = line.split(",")
        assert name in ("disc", "ring") and 0 <= float(score) <= 1
        assert 0 <= float(x) and float(x) + float(w) <= 48 + 1e-3 and 0 <= float(y) and float(y) + float(h) <= 40 + 1e-3
