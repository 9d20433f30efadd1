"""Boxes for detection: from label maps, through every spatial transform, the NIH and COCO readers,
bad boxes as errors naming the image, and batches keeping each image's boxes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsec.data.datamodule import MedicalDataModule
from medsec.data.detection import (
    boxes_from_label_map,
    check_boxes,
    detection_transforms,
    pack_boxes,
    unpack_boxes,
    xywh_to_boxes,
)
from medsec.data.sources.boxes import CocoSource, NIHBoxSource
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import DataError, user_error_message
from tests.data.fakes import shared_data


def test_boxes_from_label_map_per_component_and_per_label() -> None:
    label = np.zeros((20, 20), dtype=np.uint8)
    label[2:5, 3:9] = 1
    label[10:12, 10:12] = 1  # a second component of class 0
    label[15:18, 1:4] = 2
    label[5, 9] = 1  # touches the first block diagonally: the same component
    boxes, classes = boxes_from_label_map(label, "components")
    assert sorted(map(tuple, np.c_[classes, boxes].tolist())) == [(0, 2, 3, 6, 10), (0, 10, 10, 12, 12),
                                                                    (1, 15, 1, 18, 4)]
    boxes, classes = boxes_from_label_map(label, "labels")
    assert np.c_[classes, boxes].tolist() == [[0, 2, 3, 12, 12], [1, 15, 1, 18, 4]]
    boxes, _ = boxes_from_label_map(label, "components", min_voxels=5)
    assert len(boxes) == 2  # the 2x2 block is left out


def test_boxes_from_a_3d_label_map() -> None:
    label = np.zeros((8, 10, 12), dtype=np.uint8)
    label[1:3, 2:5, 3:9] = 2
    boxes, classes = boxes_from_label_map(label)
    assert boxes.tolist() == [[1, 2, 3, 3, 5, 9]] and classes.tolist() == [1]


def test_xywh_become_row_first_corners_and_scale() -> None:
    np.testing.assert_allclose(xywh_to_boxes([10, 20, 30, 40]), [[20, 10, 60, 40]])
    np.testing.assert_allclose(xywh_to_boxes([10, 20, 30, 40], (0.25, 0.5)), [[5, 5, 15, 20]])


@pytest.mark.parametrize(("box", "label", "message"), [
    ([5, 5, 3, 9], 0, "negative size"),
    ([5, 5, 5, 9], 0, "zero size"),
    ([-1, 5, 4, 9], 0, "outside the image"),
    ([5, 5, 9, 17], 0, "outside the image"),
    ([5, 5, 9, 9], 2, "class 2"),
    ([5, np.nan, 9, 9], 0, "not finite"),
])
def test_bad_boxes_are_errors_naming_the_image(box: list, label: int, message: str) -> None:
    with pytest.raises(DataError, match=rf"image xray-7\.png: .*{message}"):
        check_boxes(np.asarray([box], dtype=float), np.asarray([label]), (16, 16), 2, "image xray-7.png")


def test_pack_and_unpack_keep_each_image_boxes() -> None:
    packed = torch.as_tensor(np.stack([pack_boxes(np.asarray([[1, 2, 3, 4.]]), [1], 3),
                                       pack_boxes(np.zeros((0, 4)), [], 3)]))
    assert packed.shape == (2, 3, 5)
    first, second = unpack_boxes(packed)
    assert first["boxes"].tolist() == [[1, 2, 3, 4]] and first["labels"].tolist() == [1]
    assert second["boxes"].shape == (0, 4) and second["labels"].shape == (0,)
    with pytest.raises(DataError, match="img-3 has 4 boxes, more than data.pipeline.max_boxes=3"):
        pack_boxes(np.zeros((4, 4)) + [0, 0, 1, 1], [0] * 4, 3, "img-3")


# ---- boxes follow the image through every transform ------------------------------------------
def drawn_record(box: list[int], size: tuple[int, int] = (40, 48)) -> dict:
    """A dark image with a bright rectangle exactly under ``box``, which the record's label holds."""
    image = np.full((1, *size), 0.1, dtype=np.float32)
    image[0, box[0]:box[2], box[1]:box[3]] = 0.9
    image[0, 0, 0] = 0.0  # min-max scaling keeps values where they are
    return {"image": image, "label": pack_boxes(np.asarray([box], dtype=np.float32), [1]), "id": "drawn"}


def bright_inside(image: torch.Tensor, packed: torch.Tensor, margin: float) -> tuple[float, int]:
    """The share of bright pixels inside the (only) box grown by ``margin``, and the box count."""
    (target,) = unpack_boxes(packed[None])
    assert len(target["boxes"]) == 1 and target["labels"].tolist() == [1]
    b = target["boxes"][0]
    bright = (image[0] > 0.5).nonzero().float() + 0.5  # pixel centres
    inside = ((bright >= b[:2] - margin) & (bright <= b[2:] + margin)).all(1)
    return float(inside.float().mean()), len(bright)


@pytest.mark.parametrize("transform", ["none", "resize", "flip0", "flip1", "affine"])
def test_a_drawn_box_stays_under_its_box(transform: str) -> None:
    options = {"none": {}, "resize": {"image_size": 32}, "flip0": {"flip_prob": 1.0}, "flip1": {"flip_prob": 1.0},
               "affine": {"affine_prob": 1.0, "rotate_range": 0.5, "scale_range": 0.2, "flip_prob": 0.0}}[transform]
    train = transform != "none" and transform != "resize"
    pipeline = detection_transforms(train=train, reader=None, in_channels=1, spatial_dims=2,
                                    **{"image_size": None, "flip_prob": 0.0, **options})
    box = [6, 10, 18, 30]
    for seed in range(3):
        pipeline.set_random_state(seed)
        out = pipeline(drawn_record(box))
        share, count = bright_inside(out["image"], out["label"], margin=1.0)
        assert count > 0 and share == 1.0, (transform, seed)
        if transform == "none":
            assert out["label"][0].tolist() == [1, *box]
        if transform == "resize":  # 40x48 -> 32x32: rows x0.8, columns x2/3
            np.testing.assert_allclose(out["label"][0, 1:].numpy(), [4.8, 20 / 3, 14.4, 20], atol=1.0)
        if transform.startswith("flip"):  # both axes flipped (prob 1 on each)
            assert out["label"][0].tolist() == [1, 40 - 18, 48 - 30, 40 - 6, 48 - 10]


def test_boxes_from_masks_follow_flips() -> None:
    record = SyntheticSource(num_samples=(1, 1, 1), image_size=24, multilabel=True, seed=3).sample(0, 0)
    while not record["mask"].any():
        record = SyntheticSource(num_samples=(1, 1, 1), image_size=24, multilabel=True, seed=3).sample(0, 1)
    pipeline = detection_transforms(train=True, reader=None, in_channels=1, spatial_dims=2, flip_prob=1.0,
                                    boxes_from="labels")
    out = pipeline(dict(record))
    flipped = record["mask"][0, ::-1, ::-1]
    expected, classes = boxes_from_label_map(flipped, "labels")
    targets = unpack_boxes(out["label"][None])[0]
    assert targets["boxes"].tolist() == expected.tolist() and targets["labels"].tolist() == classes.tolist()


def test_batches_keep_per_image_boxes() -> None:
    source = SyntheticSource(num_samples=(8, 4, 4), image_size=24, multilabel=True)
    pipeline = lambda **kw: detection_transforms(**kw, max_boxes=4)
    datamodule = MedicalDataModule(source, batch_size=4, num_workers=0, pipeline=pipeline, augment=False)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (4, 1, 24, 24) and batch["label"].shape == (4, 4, 5)
    for case, target in zip(datamodule.records("test"), unpack_boxes(batch["label"])):
        boxes, _ = boxes_from_label_map(case["mask"][0], "components")
        assert sorted(target["boxes"].tolist()) == sorted(boxes.tolist())


# ---- readers ---------------------------------------------------------------------------------
NIH_ROWS = [("a.png", "Nodule", 100.0, 200.0, 40.0, 80.0), ("a.png", "Mass", 512.0, 0.0, 512.0, 1024.0),
            ("b.png", "Atelectasis", 0.0, 0.0, 1024.0, 512.0), ("c.png", "Effusion", 10.0, 20.0, 30.0, 40.0),
            ("d.png", "Infiltrate", 1.5, 2.5, 3.5, 4.5)]


def write_nih(root: Path, rows: list[tuple] = NIH_ROWS, official: bool = False, size: int = 256) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in {r[0] for r in rows}:
        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(root / "images" / name)
    header = "Image Index,Finding Label,Bbox [x,y,w,h],,," if official else "image,finding,x,y,w,h"
    tail = ",,," if official else ""
    lines = [header] + [",".join(map(str, r)) + tail for r in rows]
    (root / "bbox.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("official", [False, True])
def test_nih_reader_scales_boxes_to_the_image(tmp_path: Path, official: bool) -> None:
    data = NIHBoxSource(str(write_nih(tmp_path, official=official)), csv="bbox.csv").load()
    records = {r["id"]: r for split in data.splits.values() for r in split}
    assert sorted(records) == ["a.png", "b.png", "c.png", "d.png"]
    rows = np.asarray(records["a.png"]["label"])
    nodule, mass = data.class_names.index("Nodule"), data.class_names.index("Mass")
    # (x, y, w, h) in 1024 px -> row-first corners in 256 px
    np.testing.assert_allclose(rows, [[nodule, 50, 25, 70, 35], [mass, 0, 128, 256, 256]])
    assert sum(data.train_class_counts) == sum(len(np.asarray(r["label"])) for r in data.splits["train"])


@pytest.mark.parametrize(("row", "message"), [
    (("a.png", "Nodule", 10, 10, -5, 20), r"bbox.csv line 2 \(image a.png\): box .* negative size"),
    (("a.png", "Nodule", 1000, 10, 50, 20), r"bbox.csv line 2 \(image a.png\): box .* outside the image"),
    (("a.png", "Fracture", 10, 10, 5, 20), r"bbox.csv line 2 \(image a.png\): unknown finding 'Fracture'"),
    (("zz.png", "Nodule", 10, 10, 5, 20), r"line 2 \(image zz.png\): image file not found"),
])
def test_nih_reader_names_the_image_of_a_bad_box(tmp_path: Path, row: tuple, message: str) -> None:
    write_nih(tmp_path, [("a.png", "Nodule", 1, 1, 1, 1)])
    lines = (tmp_path / "bbox.csv").read_text().splitlines()
    (tmp_path / "bbox.csv").write_text("\n".join([lines[0], ",".join(map(str, row))]) + "\n")
    with pytest.raises(DataError, match=message):
        NIHBoxSource(str(tmp_path), csv="bbox.csv").load()


def test_nih_sample_12_boxes_scale_to_256_px() -> None:
    root = shared_data("nih_cxr14_sample")
    data = NIHBoxSource(str(root), csv="bbox_1024px.csv").load()
    records = [r for split in data.splits.values() for r in split]
    assert sum(len(np.asarray(r["label"])) for r in records) == 12
    expected = {}
    for line in (root / "bbox_1024px.csv").read_text().splitlines()[1:]:
        name, _, *xywh = line.split(",")
        expected[name] = xywh_to_boxes(np.asarray(xywh, dtype=float), (0.25, 0.25))
    for record in records:
        boxes = np.asarray(record["label"])[:, 1:]
        np.testing.assert_allclose(boxes, expected[record["id"]], rtol=1e-6)
        assert (boxes >= 0).all() and (boxes <= 256).all()


def write_coco(root: Path, annotations: list[dict], images: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(np.zeros((32, 48), dtype=np.uint8)).save(root / f"im{i}.png")
    coco = {"images": [{"id": i, "file_name": f"im{i}.png", "width": 48, "height": 32} for i in range(images)],
            "annotations": annotations, "categories": [{"id": 7, "name": "nodule"}, {"id": 3, "name": "mass"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_coco_reader(tmp_path: Path) -> None:
    annotations = [{"image_id": 0, "category_id": 7, "bbox": [4, 2, 10, 6]},
                   {"image_id": 1, "category_id": 3, "bbox": [0, 0, 48, 32]}]
    data = CocoSource(str(write_coco(tmp_path, annotations)), fractions=(0.5, 0.25, 0.25)).load()
    assert data.class_names == ["mass", "nodule"]  # categories by id
    records = {r["id"]: r for split in data.splits.values() for r in split}
    np.testing.assert_allclose(records["im0.png"]["label"], [[1, 2, 4, 8, 14]])
    np.testing.assert_allclose(records["im1.png"]["label"], [[0, 0, 0, 32, 48]])
    assert np.asarray(records["im3.png"]["label"]).shape == (0, 5)  # a negative image


@pytest.mark.parametrize(("annotation", "message"), [
    ({"image_id": 2, "category_id": 7, "bbox": [4, 2, -10, 6]}, r"annotation 0 \(image im2.png\): box .* negative size"),
    ({"image_id": 2, "category_id": 7, "bbox": [40, 2, 10, 6]}, r"annotation 0 \(image im2.png\): box .* outside the image"),
    ({"image_id": 2, "category_id": 9, "bbox": [4, 2, 10, 6]}, r"annotation 0 \(image im2.png\): unknown category id 9"),
    ({"image_id": 5, "category_id": 7, "bbox": [4, 2, 10, 6]}, r"annotation 0 refers to image id 5"),
])
def test_coco_reader_names_the_image_of_a_bad_box(tmp_path: Path, annotation: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        CocoSource(str(write_coco(tmp_path, [annotation]))).load()


def test_pipeline_refuses_a_box_outside_the_image_naming_it() -> None:
    record = {"image": np.zeros((1, 16, 16), np.float32), "label": pack_boxes(np.asarray([[2, 2, 20, 8.]]), [0]),
              "id": "case-9"}
    pipeline = detection_transforms(train=False, reader=None, in_channels=1, spatial_dims=2)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what a transform raises
        pipeline(record)
    assert re.search(r"image case-9: box .* outside the image of size \[16, 16\]", user_error_message(info.value))
