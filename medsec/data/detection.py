"""Boxes for detection: from label maps, checked, carried through the spatial transforms, packed.

Convention (the whole detection path): a box is ``(min_0, min_1[, min_2], max_0, max_1[, max_2])``
along the *array* axes of the image (row first in 2D; MONAI's standard corner mode), in pixel-edge
coordinates: the box ``(2, 3, 6, 9)`` covers rows 2-5 and columns 3-8. Classes are 0-based
foreground indices into the data's class names. COCO/NIH boxes (``x, y, w, h`` with x the column)
are converted on reading (:func:`xywh_to_boxes`); torchvision's (x, y) order is the detector's business.

Where boxes come from, per record (:class:`DetectionTargetd`):

* a ``mask`` (a label map: synthetic lesions, Decathlon labels): boxes are taken from the mask
  *after* every spatial transform, one per connected component of each label (``boxes_from:
  components``) or one per label present (``labels``), so they fit the transformed image exactly;
* otherwise ``label`` holds packed boxes (rows ``(class, *box)``, what the box sources write and
  what an AES store keeps): they become a box mask (MONAI's ``convert_box_to_mask``, one channel
  per box), travel through resizing, flips and affine augmentation with nearest-neighbour
  interpolation, and come back as boxes (``convert_mask_to_box``).

The batch's ``label`` is a float tensor ``(N, max_boxes, 1 + 2 * dims)`` of rows
``(class, *box)`` padded with class ``-1`` (:func:`pack_boxes` / :func:`unpack_boxes`): one fixed
shape, so the default collate, MONAI's caches, the AES store and the attack code carry per-image
box lists unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import convert_box_to_mask, convert_mask_to_box
from monai.transforms import Compose, EnsureTyped, MapTransform, RandAffined, RandFlipd, Resized
from scipy import ndimage

from medsec.data.intensity import intensity_transforms
from medsec.data.transforms import ToChannelsd
from medsec.errors import ConfigError, DataError

BoxesFrom = Literal["components", "labels"]
PAD = -1
"""The class of a padding row in packed boxes."""


# ---- boxes ------------------------------------------------------------------------------------
def xywh_to_boxes(xywh: np.ndarray, scale: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """COCO/NIH ``(x, y, w, h)`` rows (x = column) to row-first corner boxes, each coordinate
    multiplied by ``scale`` = (row scale, column scale)."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = xywh.T
    boxes = np.stack([y, x, y + h, x + w], axis=1)
    return (boxes * np.tile(np.asarray(scale, dtype=np.float64), 2)).astype(np.float32)


def check_boxes(boxes: np.ndarray, labels: np.ndarray, shape: Sequence[int] | None, num_classes: int,
                where: str) -> None:
    """Raise a :class:`DataError` naming ``where`` (the image) for a box that is not finite, has
    zero or negative size, lies outside an image of spatial ``shape`` (``None``: unknown), or has a
    class outside ``0..num_classes-1``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    labels = np.asarray(labels)
    dims = boxes.shape[1] // 2 if boxes.ndim == 2 else 0
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6) or len(labels) != len(boxes):
        raise DataError(f"{where}: boxes have shape {boxes.shape} for {len(labels)} labels; expected (K, 4) or (K, 6)")
    for k, (box, label) in enumerate(zip(boxes, labels)):
        what = f"{where}: box {k} {np.round(box, 2).tolist()}"
        if not np.isfinite(box).all():
            raise DataError(f"{what} is not finite")
        size = box[dims:] - box[:dims]
        if (size <= 0).any():
            raise DataError(f"{what} has {'negative' if (size < 0).any() else 'zero'} size {np.round(size, 2).tolist()}")
        if shape is not None and ((box[:dims] < 0).any() or (box[dims:] > np.asarray(shape, dtype=np.float64)).any()):
            raise DataError(f"{what} lies outside the image of size {list(shape)}")
        if not (float(label).is_integer() and 0 <= int(label) < num_classes):
            raise DataError(f"{where}: box {k} has class {label}, not one of the {num_classes} classes "
                            f"0..{num_classes - 1}")


def boxes_from_label_map(label_map: np.ndarray, by: BoxesFrom = "components",
                         min_voxels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a label map (value k > 0 = class k - 1): one per connected component of each
    value (full connectivity: diagonal neighbours touch) or one per value present. Components
    smaller than ``min_voxels`` are left out. Returns (boxes ``(K, 2 * dims)``, classes ``(K,)``)."""
    if by not in ("components", "labels"):
        raise ConfigError(f"data.pipeline.boxes_from must be 'components' or 'labels', got {by!r}")
    label_map = np.asarray(label_map)
    dims = label_map.ndim
    boxes: list[list[int]] = []
    classes: list[int] = []
    for value in np.unique(label_map[label_map > 0]):
        region = label_map == value
        if by == "labels":
            pieces, count = region.astype(np.int32), 1
        else:
            pieces, count = ndimage.label(region, structure=np.ones((3,) * dims))
        for index, found in enumerate(ndimage.find_objects(pieces, max_label=count), start=1):
            if found is None or (by == "components" and (pieces[found] == index).sum() < min_voxels) \
                    or (by == "labels" and region.sum() < min_voxels):
                continue
            boxes.append([s.start for s in found] + [s.stop for s in found])
            classes.append(int(value) - 1)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 2 * dims), np.asarray(classes, dtype=np.int64))


def pack_boxes(boxes: np.ndarray, classes: np.ndarray, max_boxes: int | None = None, where: str = "image") -> np.ndarray:
    """Rows ``(class, *box)``, padded with class -1 to ``max_boxes`` rows (``None``: no padding);
    a :class:`DataError` naming ``where`` when there are more boxes than that."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2:
        raise ValueError(f"boxes must have shape (K, 2 * dims), got {boxes.shape}")
    rows = np.concatenate([np.asarray(classes, dtype=np.float32).reshape(-1, 1), boxes], 1)
    if max_boxes is None:
        return rows
    if len(rows) > max_boxes:
        raise DataError(f"{where} has {len(rows)} boxes, more than data.pipeline.max_boxes={max_boxes}")
    padded = np.full((max_boxes, rows.shape[1]), PAD, dtype=np.float32)
    padded[: len(rows)] = rows
    return padded


def unpack_boxes(packed: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A batch of packed boxes ``(N, M, 1 + 2 * dims)`` to per-image ``{"boxes", "labels"}``."""
    targets = []
    for rows in packed:
        rows = rows[rows[:, 0] > PAD]
        targets.append({"boxes": rows[:, 1:].float(), "labels": rows[:, 0].long()})
    return targets


# ---- transforms -------------------------------------------------------------------------------
class DetectionTargetd(MapTransform):
    """First step after reading: a record with a ``mask`` keeps it (boxes come from it at the
    end); otherwise its packed ``label`` boxes are checked against the image (errors name the
    record) and become ``box_mask`` (one channel per box, value class + 1, background 0), which
    the spatial transforms carry like a label map. ``labelled=False`` records pass unchanged."""

    def __init__(self, spatial_dims: int, num_classes: int | None = None) -> None:
        super().__init__(("label", "mask"), allow_missing_keys=True)
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get("id", "?")
        shape = tuple(d["image"].shape[1:])
        if len(shape) != self.spatial_dims:
            raise DataError(f"image {case}: shape {tuple(d['image'].shape)} has not {self.spatial_dims} spatial "
                            "dimensions and a channel")
        if d.get("mask") is not None:
            d.pop("label", None)
            if tuple(d["mask"].shape[-len(shape):]) != shape:
                raise DataError(f"image {case}: mask shape {tuple(d['mask'].shape)} differs from image shape {shape}")
            return d
        if "label" not in d:
            return d
        rows = np.asarray(d.pop("label"), dtype=np.float32).reshape(-1, 1 + 2 * self.spatial_dims)
        rows = rows[rows[:, 0] > PAD]
        check_boxes(rows[:, 1:], rows[:, 0], shape, self.num_classes or int(rows[:, 0].max(initial=0)) + 1,
                    f"image {case}")
        d["box_mask"] = convert_box_to_mask(rows[:, 1:], rows[:, 0].astype(np.int64) + 1, shape, bg_label=0)
        return d


class BoxesFromMasksd(MapTransform):
    """Last spatial step: ``mask`` (label map) or ``box_mask`` to packed boxes in ``label``
    (``max_boxes`` rows); the masks are dropped."""

    def __init__(self, boxes_from: BoxesFrom = "components", max_boxes: int = 32, min_voxels: int = 1) -> None:
        super().__init__(("mask", "box_mask"), allow_missing_keys=True)
        if boxes_from not in ("components", "labels"):
            raise ConfigError(f"data.pipeline.boxes_from must be 'components' or 'labels', got {boxes_from!r}")
        self.boxes_from, self.max_boxes, self.min_voxels = boxes_from, max_boxes, min_voxels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        where = f"image {d.get('id', '?')}"
        if d.get("mask") is not None:
            mask = np.asarray(torch.as_tensor(d.pop("mask")).cpu())
            boxes, classes = boxes_from_label_map(mask[0], self.boxes_from, self.min_voxels)
        elif d.get("box_mask") is not None:
            box_mask = np.asarray(torch.as_tensor(d.pop("box_mask")).cpu()).round().astype(np.int16)
            boxes, classes = convert_mask_to_box(box_mask, bg_label=0)
            classes = np.asarray(classes, dtype=np.int64) - 1
        else:
            return d
        d["label"] = pack_boxes(boxes, classes, self.max_boxes, where)
        return d


def detection_transforms(
    *,
    train: bool,
    reader: Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]] | None,
    in_channels: int,
    spatial_dims: int,
    image_size: int | Sequence[int] | None = None,
    augment: bool = True,
    multilabel: bool = False,
    intensity: Mapping[str, Any] | None = None,
    labelled: bool = True,
    boxes_from: BoxesFrom = "components",
    max_boxes: int = 32,
    min_voxels: int = 1,
    flip_prob: float = 0.5,
    affine_prob: float = 0.0,
    rotate_range: float = 0.1,
    scale_range: float = 0.1,
    seed: int = 0,
) -> Compose:
    """The detection pipeline: read, boxes to a box mask (or keep the label map), intensities to
    [0, 1], channels, resize to ``image_size``, (train:) random flips on every axis and affine
    transforms, boxes from the transformed masks, type.

    Output: ``image`` float32 ``(in_channels, *spatial)`` in [0, 1] and ``label`` float32 packed
    boxes ``(max_boxes, 1 + 2 * dims)`` (:func:`pack_boxes`). ``boxes_from``: boxes of a label
    map per connected component or per label; ``min_voxels``: smaller components are left out.
    ``seed`` seeds the augmentations' random stream (MONAI's transforms draw from their own
    generators, which Lightning's ``seed_everything`` does not reach), so that a run repeats
    exactly, from plain records or from an AES store. ``multilabel`` is accepted for the
    DataModule's sake.
    """
    if max_boxes < 1:
        raise ConfigError(f"data.pipeline.max_boxes must be positive, got {max_boxes}")
    masks = ("mask", "box_mask")
    keys = ("image", *masks)
    steps: list = [reader] if reader is not None else []
    steps += [EnsureTyped("image", dtype=torch.float32, track_meta=True)]
    if labelled:
        steps.append(DetectionTargetd(spatial_dims))
    steps += [*intensity_transforms(intensity), ToChannelsd("image", in_channels)]
    if image_size:
        size = (image_size,) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
        steps += [Resized("image", spatial_size=size, mode="area"),
                  Resized(masks, spatial_size=size, mode="nearest", allow_missing_keys=True)]
    if train and augment:
        steps += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis, allow_missing_keys=True)
                  for axis in range(spatial_dims)]
        if affine_prob:
            steps.append(RandAffined(keys, prob=affine_prob, rotate_range=[rotate_range] * (1 if spatial_dims == 2 else 3),
                                     scale_range=[scale_range] * spatial_dims, padding_mode="zeros",
                                     mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True))
    if labelled:
        steps.append(BoxesFromMasksd(boxes_from, max_boxes, min_voxels))
    steps.append(EnsureTyped("image", dtype=torch.float32, track_meta=False))
    if labelled:
        steps.append(EnsureTyped("label", dtype=torch.float32, track_meta=False))
    return Compose(steps).set_random_state(seed=seed)
