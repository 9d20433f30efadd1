"""A procedural, learnable medical-looking data set: no download, deterministic given a seed.

Each image is a smooth "tissue" background with noise. Lesions are small shapes (disc, ring,
square, cross, diamond) brighter than the background. Multi-class: class 0 is healthy and class k
holds one lesion of shape k-1. Multi-label: finding f is present (independently) when a lesion of
shape f is drawn. Every image comes with a segmentation mask whose value is shape index + 1.
Works in 2D and 3D.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import zoom

from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.errors import DataError

SHAPES = ("disc", "ring", "square", "cross", "diamond")


def _shape_mask(shape: str, grid: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of one lesion; ``grid`` has shape (dims, *spatial)."""
    offset = np.abs(grid - centre.reshape(-1, *([1] * (grid.ndim - 1))))
    euclid = np.sqrt((offset**2).sum(0))
    chebyshev = offset.max(0)
    if shape == "disc":
        return euclid <= radius
    if shape == "ring":
        return (euclid <= radius) & (euclid >= 0.55 * radius)
    if shape == "square":
        return chebyshev <= 0.8 * radius
    if shape == "cross":
        thin_axes = (offset <= radius / 3).sum(0)
        return (chebyshev <= radius) & (thin_axes >= grid.shape[0] - 1)
    if shape == "diamond":
        return offset.sum(0) <= 1.2 * radius
    raise DataError(f"unknown synthetic lesion shape '{shape}'")


class SyntheticSource(DataSource):
    """Generate a synthetic classification/segmentation data set.

    Args:
        num_samples: images per split (train, val, test).
        image_size: edge length in pixels (voxels in 3D).
        spatial_dims: 2 or 3.
        num_classes: multi-class: classes including "healthy" (2..6); multi-label: findings (1..5).
        multilabel: draw findings independently instead of one class per image.
        noise: standard deviation of the additive Gaussian noise (images lie in [0, 1]).
        contrast: (low, high) lesion brightness above the background.
        seed: the same seed gives the same images, whatever ``num_samples`` is.
    """

    def __init__(
        self,
        num_samples: Sequence[int] = (1200, 300, 300),
        image_size: int = 32,
        spatial_dims: int = 2,
        num_classes: int = 2,
        multilabel: bool = False,
        noise: float = 0.08,
        contrast: Sequence[float] = (0.15, 0.4),
        seed: int = 0,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise DataError(f"synthetic: spatial_dims must be 2 or 3, got {spatial_dims}")
        max_classes = len(SHAPES) if multilabel else len(SHAPES) + 1
        min_classes = 1 if multilabel else 2
        if not min_classes <= num_classes <= max_classes:
            raise DataError(f"synthetic: num_classes must be in [{min_classes}, {max_classes}], got {num_classes}")
        if len(num_samples) != 3 or min(num_samples) < 1:
            raise DataError(f"synthetic: num_samples needs three positive counts (train, val, test), got {list(num_samples)}")
        if image_size < 12:
            raise DataError(f"synthetic: image_size must be at least 12, got {image_size}")
        self.num_samples = tuple(int(n) for n in num_samples)
        self.image_size = int(image_size)
        self.spatial_dims = int(spatial_dims)
        self.num_classes = int(num_classes)
        self.multilabel = bool(multilabel)
        self.noise = float(noise)
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.seed = int(seed)

    @property
    def class_names(self) -> list[str]:
        if self.multilabel:
            return list(SHAPES[: self.num_classes])
        return ["healthy", *SHAPES[: self.num_classes - 1]]

    def load(self) -> SourceData:
        splits = {
            split: [self.sample(split_id, i) for i in range(count)]
            for split_id, (split, count) in enumerate(zip(SPLITS, self.num_samples))
        }
        return SourceData(
            splits=splits,
            class_names=self.class_names,
            multilabel=self.multilabel,
            spatial_dims=self.spatial_dims,
            info={"source": "synthetic", "seed": self.seed},
        )

    def sample(self, split_id: int, index: int) -> Record:
        """Draw one record; depends only on (seed, split, index)."""
        rng = np.random.default_rng([self.seed, split_id, index])
        size, dims = self.image_size, self.spatial_dims
        coarse = rng.uniform(0.15, 0.45, size=(4,) * dims)
        image = zoom(coarse, size / 4, order=3, mode="nearest")[(slice(0, size),) * dims]
        mask = np.zeros((size,) * dims, dtype=np.uint8)
        if self.multilabel:
            present = rng.random(self.num_classes) < 0.35
            shapes = np.flatnonzero(present)
            label: int | np.ndarray = present.astype(np.float32)
        else:
            cls = int(rng.integers(self.num_classes))
            shapes = np.asarray([cls - 1]) if cls > 0 else np.asarray([], dtype=int)
            label = cls
        grid = np.indices((size,) * dims, dtype=np.float32)
        for shape_idx in shapes:
            radius = rng.uniform(0.12, 0.2) * size
            centre = rng.uniform(radius + 1, size - radius - 1, size=dims).astype(np.float32)
            lesion = _shape_mask(SHAPES[shape_idx], grid, centre, radius)
            image = image + lesion * rng.uniform(*self.contrast)
            mask[lesion] = shape_idx + 1
        image = image + rng.normal(0.0, self.noise, size=image.shape)
        image = np.clip(image, 0.0, 1.0).astype(np.float32)
        return {
            "image": image[None],
            "label": label,
            "mask": mask[None],
            "id": f"synthetic-{SPLITS[split_id]}-{index:06d}",
        }
