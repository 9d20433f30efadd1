"""Sources of images with boxes: NIH ChestX-ray14's ``BBox_List_2017.csv`` and COCO-style JSON.

Records hold the image path and, in ``label``, the image's boxes packed as rows ``(class, *box)``
(row-first corner boxes in the image's own pixels: :mod:`medsec.data.detection`). Every box is
checked on reading: a box of negative or zero size, one outside the image, or an unknown class
stops with a :class:`DataError` naming the file, the line or annotation, and the image. Boxes from
label maps (synthetic lesions, Decathlon labels) need no source: the detection pipeline takes
them from the masks.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsec.data.detection import check_boxes, pack_boxes, xywh_to_boxes
from medsec.data.sources.base import (
    SPLITS,
    DataSource,
    Record,
    SourceData,
    read_csv,
    require_path,
    split_by_group,
)
from medsec.data.sources.chestxray14 import _image_paths
from medsec.errors import DataError

NIH_BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia",
                    "Pneumothorax")
"""The eight findings NIH boxed (``Infiltrate``, as the box list spells it)."""
NIH_HEADERS = (("Image Index", "Finding Label"), ("image", "finding"))


def image_size(path: Path) -> tuple[int, int]:
    """(rows, columns) of a 2D image file, from its header (PNG/JPEG) without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image file {path}: {err}") from err
    return height, width


class BoxSource(DataSource):
    """What the box sources share: a seeded split by image and per-class box counts."""

    fractions: tuple[float, float, float]
    seed: int

    def _source_data(self, records: list[Record], class_names: Sequence[str], info: dict[str, Any]) -> SourceData:
        if len(records) < 3:
            raise DataError(f"{info.get('source')}: {len(records)} image(s) with boxes; train, val and test need at least 3")
        splits = split_by_group([r["id"] for r in records], self.fractions, self.seed)
        counts = np.zeros(len(class_names), dtype=np.int64)
        for i in splits["train"]:
            classes = np.asarray(records[i]["label"], dtype=np.float32).reshape(-1, 5)[:, 0].astype(np.int64)
            counts += np.bincount(classes, minlength=len(class_names))
        return SourceData(splits={s: [records[i] for i in splits[s]] for s in SPLITS}, class_names=list(class_names),
                          from_files=True, train_class_counts=counts.tolist(),
                          info={**info, "cases": {s: [records[i]["id"] for i in splits[s]] for s in SPLITS}})


class NIHBoxSource(BoxSource):
    """NIH ChestX-ray14 boxes: ``BBox_List_2017.csv`` (``Image Index, Finding Label, Bbox [x, y, w,
    h]``) or the same columns named ``image, finding, x, y, w, h``, in ``original_size``-pixel
    coordinates (NIH's 1024 px), scaled to each image file's actual size (e.g. 256 px).

    Args:
        root: the data folder (images in ``root/image_dir`` or NIH's ``images_*/images``).
        csv: the box list, relative to ``root`` (or absolute).
        class_names: the box classes (default NIH's eight); a finding not among them is an error.
        original_size: the edge length the box coordinates refer to.
        fractions, seed: the split of the boxed images.
    """

    def __init__(self, root: str, csv: str = "BBox_List_2017.csv", image_dir: str = "images",
                 class_names: Sequence[str] = NIH_BOX_FINDINGS, original_size: int = 1024,
                 fractions: Sequence[float] = (0.5, 0.25, 0.25), seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.csv = csv
        self.image_dir = image_dir
        self.class_names = list(class_names)
        self.original_size = int(original_size)
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)

    def load(self) -> SourceData:
        csv = require_path(self.root / self.csv, "NIH box list")
        frame = read_csv(csv, [])
        if tuple(frame.columns[:2]) not in NIH_HEADERS or len(frame.columns) < 6:
            raise DataError(f"{csv} is not an NIH box list: its header starts {list(frame.columns[:6])}; expected "
                            "'Image Index, Finding Label, Bbox [x, y, w, h]' or 'image, finding, x, y, w, h'")
        paths = _image_paths(self.root, self.image_dir)
        index = {name: k for k, name in enumerate(self.class_names)}
        boxes: dict[str, list[np.ndarray]] = defaultdict(list)
        classes: dict[str, list[int]] = defaultdict(list)
        scales: dict[str, tuple[float, float]] = {}
        for row, values in enumerate(frame.iloc[:, :6].itertuples(index=False)):
            name, finding, *xywh = (str(v).strip() for v in values)
            where = f"{csv} line {row + 2} (image {name})"
            if finding not in index:
                raise DataError(f"{where}: unknown finding '{finding}'; known: {', '.join(self.class_names)}")
            try:
                numbers = np.asarray([float(v) for v in xywh])
            except ValueError:
                raise DataError(f"{where}: box {xywh} is not four numbers x, y, w, h") from None
            box = xywh_to_boxes(numbers)
            check_boxes(box, [index[finding]], (self.original_size,) * 2, len(self.class_names), where)
            if name not in paths:
                raise DataError(f"{where}: image file not found under {self.root / self.image_dir}")
            if name not in scales:
                rows, cols = image_size(paths[name])
                scales[name] = (rows / self.original_size, cols / self.original_size)
            boxes[name].append(xywh_to_boxes(numbers, scales[name])[0])
            classes[name].append(index[finding])
        records = [{"image": str(paths[name]), "id": name, "label": pack_boxes(np.stack(boxes[name]), classes[name])}
                   for name in sorted(boxes)]
        return self._source_data(records, self.class_names, {"source": "nih_boxes", "csv": str(csv)})


class CocoSource(BoxSource):
    """Your own images with boxes in a COCO-style JSON file: ``images`` (``id``, ``file_name``,
    optional ``width``/``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` as
    ``[x, y, w, h]`` in pixels, x the column) and ``categories`` (``id``, ``name``). Images without
    annotations are kept as negatives.

    Args:
        root: the data folder; ``file_name`` is relative to ``root/image_dir``.
        annotations: the JSON file, relative to ``root`` (or absolute).
        class_names: the classes in this order (default: the categories by id); an annotation of
            a category not among them is an error.
        fractions, seed: the split of the images.
    """

    def __init__(self, root: str, annotations: str = "annotations.json", image_dir: str = ".",
                 class_names: Sequence[str] | None = None, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.annotations = annotations
        self.image_dir = image_dir
        self.class_names = list(class_names) if class_names else None
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)

    def load(self) -> SourceData:
        path = require_path(self.root / self.annotations, "COCO annotation file")
        try:
            coco = json.loads(path.read_text())
            images = {int(im["id"]): im for im in coco["images"]}
            categories = {int(c["id"]): str(c["name"]) for c in coco.get("categories", [])}
            annotations = list(coco.get("annotations", []))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot read COCO file {path}: {type(err).__name__}: {err}") from err
        class_names = self.class_names or [categories[k] for k in sorted(categories)]
        index = {name: k for k, name in enumerate(class_names)}
        boxes: dict[int, list[np.ndarray]] = defaultdict(list)
        classes: dict[int, list[int]] = defaultdict(list)
        for n, ann in enumerate(annotations):
            image = images.get(ann.get("image_id"))
            if image is None:
                raise DataError(f"{path}: annotation {n} refers to image id {ann.get('image_id')!r}, not in 'images'")
            where = f"{path}: annotation {n} (image {image.get('file_name')})"
            name = categories.get(ann.get("category_id"))
            if name not in index:
                raise DataError(f"{where}: unknown category id {ann.get('category_id')!r} ({name}); known: "
                                f"{', '.join(class_names)}")
            try:
                box = xywh_to_boxes(np.asarray(ann["bbox"], dtype=np.float64))
            except (KeyError, ValueError, TypeError):
                raise DataError(f"{where}: 'bbox' is not four numbers [x, y, w, h]") from None
            shape = (image["height"], image["width"]) if "height" in image and "width" in image else None
            check_boxes(box, [index[name]], shape, len(class_names), where)
            boxes[int(image["id"])].append(box[0])
            classes[int(image["id"])].append(index[name])
        records = []
        for image_id, image in sorted(images.items()):
            file = self.root / self.image_dir / str(image.get("file_name", ""))
            if not file.is_file():
                raise DataError(f"{path}: image {image_id} file not found: {file}")
            found = np.stack(boxes[image_id]) if boxes[image_id] else np.zeros((0, 4), np.float32)
            records.append({"image": str(file), "id": str(image.get("file_name")),
                            "label": pack_boxes(found, classes[image_id])})
        return self._source_data(records, class_names, {"source": "coco", "annotations": str(path)})
