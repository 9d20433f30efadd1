"""Short training runs on the real data in ../shared/data (skipped, with the reason, when absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_verb
from tests.data.fakes import shared_data

pytestmark = pytest.mark.realdata
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
         "data.num_workers=0", "callbacks.rich_progress_bar=null"]


@pytest.mark.slow
def test_nih_multilabel_pipeline(tmp_path: Path) -> None:
    root = shared_data("nih_cxr14_sample")
    metrics = run_verb("train", ["data=chestxray14", f"data.source.root={root}", "data.image_size=64",
                                 "data.batch_size=16", "model.net.width=8", *SHORT], tmp_path)
    per_finding = {k: v for k, v in metrics.items() if k.startswith("test/auroc_")}
    assert len(per_finding) == 14 and "test/auroc_Pleural_Thickening" in per_finding
    scored = [v for v in per_finding.values() if v is not None]  # None: no positives in the split
    assert len(scored) >= 10 and all(0.0 <= v <= 1.0 for v in scored)
    assert metrics["test/auroc"] == pytest.approx(np.mean(scored), abs=1e-4)  # their macro mean
    assert 0.0 <= metrics["test/acc"] <= 1.0  # mean per-finding accuracy at 0.5 (3 batches: about 0.5)
    frame = pd.read_csv(tmp_path / "predictions.csv")
    targets, probs = frame.filter(like="target_").to_numpy(), frame.filter(like="prob_").to_numpy()
    assert targets.shape == probs.shape and targets.shape[1] == 14 and set(np.unique(targets)) <= {0, 1}
    assert frame["id"].is_unique and 100 < len(frame) < 200  # the patient-disjoint 20 % of 621 images
    assert ((probs >= 0) & (probs <= 1)).all()  # independent sigmoids, not a softmax
    assert (tmp_path / "plots" / "roc_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("flag", "test_size", "positives"),
                         [("pneumoniamnist", 624, 390), ("breastmnist", 156, 114)])
def test_medmnist_official_test_split(tmp_path: Path, flag: str, test_size: int, positives: int) -> None:
    shared_data(flag)
    metrics = run_verb("train", ["data=medmnist", f"data.source.flag={flag}", "data.batch_size=64",
                                 "model.net.width=8", *SHORT], tmp_path)
    frame = pd.read_csv(tmp_path / "predictions.csv")  # one row per test image: the whole official split
    assert len(frame) == test_size and frame["id"].is_unique and int(frame["label"].sum()) == positives
    probs = frame.filter(like="prob_").to_numpy()
    assert probs.shape == (test_size, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    accuracy = (probs.argmax(axis=1) == frame["label"].to_numpy()).mean()
    assert metrics["test/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert 0.0 <= metrics["test/auroc"] <= 1.0 and np.isfinite(metrics["test/loss"])
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"test/auroc", "test/acc", "val/auroc", "train/loss_epoch"} <= set(header)
