"""Short training runs on the real data in ../shared/data (skipped, with the reason, when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_verb
from tests.data.fakes import shared_data

pytestmark = pytest.mark.realdata
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
         "data.num_workers=0", "callbacks.rich_progress_bar=null"]


def test_nih_multilabel_pipeline(tmp_path: Path) -> None:
    root = shared_data("nih_cxr14_sample")
    metrics = run_verb("train", ["data=chestxray14", f"data.source.root={root}", "data.image_size=64",
                                 "data.batch_size=16", "model.net.width=8", *SHORT], tmp_path)
    per_finding = [k for k in metrics if k.startswith("test/auroc_")]
    assert len(per_finding) == 14 and "test/auroc_Pleural_Thickening" in per_finding
    assert metrics["test/auroc"] is not None
    assert (tmp_path / "plots" / "roc_curves.png").is_file()


@pytest.mark.parametrize(("flag", "test_size"), [("pneumoniamnist", 624), ("breastmnist", 156)])
def test_medmnist_official_test_split(tmp_path: Path, flag: str, test_size: int) -> None:
    shared_data(flag)
    metrics = run_verb("train", ["data=medmnist", f"data.source.flag={flag}", "data.batch_size=64",
                                 "model.net.width=8", *SHORT], tmp_path)
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "test/auroc" in rows.splitlines()[0]
