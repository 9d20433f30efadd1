"""The built-in synthetic source: deterministic, labelled consistently with its masks, 2D and 3D."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.data.sources.synthetic import SHAPES, SyntheticSource
from medsec.errors import DataError


def test_same_seed_same_images_whatever_the_count() -> None:
    small = SyntheticSource(num_samples=(4, 2, 2), seed=3).load()
    large = SyntheticSource(num_samples=(9, 5, 5), seed=3).load()
    other = SyntheticSource(num_samples=(4, 2, 2), seed=4).load()
    for a, b in zip(small.splits["train"], large.splits["train"]):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(small.splits["train"][0]["image"], other.splits["train"][0]["image"])


def test_labels_agree_with_masks_multiclass() -> None:
    data = SyntheticSource(num_samples=(60, 2, 2), num_classes=4, image_size=24).load()
    assert data.class_names == ["healthy", "disc", "ring", "square"]
    for record in data.splits["train"]:
        values = set(np.unique(record["mask"])) - {0}
        assert values == (set() if record["label"] == 0 else {record["label"]})
        assert record["image"].shape == (1, 24, 24) and record["image"].dtype == np.float32
        assert 0.0 <= record["image"].min() and record["image"].max() <= 1.0
    assert {r["label"] for r in data.splits["train"]} == {0, 1, 2, 3}


def test_lesions_are_brighter_than_tissue() -> None:
    data = SyntheticSource(num_samples=(40, 2, 2), noise=0.0).load()
    diffs = [r["image"][r["mask"] > 0].mean() - r["image"][r["mask"] == 0].mean()
             for r in data.splits["train"] if r["label"]]
    assert min(diffs) > 0.05


def test_multilabel_and_3d() -> None:
    data = SyntheticSource(num_samples=(30, 2, 2), num_classes=3, multilabel=True, spatial_dims=3, image_size=16).load()
    assert data.class_names == list(SHAPES[:3]) and data.multilabel and data.spatial_dims == 3
    for record in data.splits["train"]:
        assert record["image"].shape == (1, 16, 16, 16)
        assert record["label"].dtype == np.float32 and record["label"].shape == (3,)
        present = {int(v) - 1 for v in np.unique(record["mask"]) if v}
        assert present <= set(np.flatnonzero(record["label"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"spatial_dims": 4}, "spatial_dims must be 2 or 3"), ({"num_classes": 9}, "num_classes must be in"),
     ({"num_samples": (5, 0, 5)}, "three positive counts"), ({"image_size": 8}, "image_size must be at least 12")],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        SyntheticSource(**kwargs)
