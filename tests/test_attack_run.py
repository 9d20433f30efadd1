"""`medsec attack` end to end on a tiny trained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, medsec_cli, run_verb

SMALL = ["max_images=64", "train_images=64"]


def test_attack_verb_writes_report_table_and_plots(learned_run: Path, tmp_path: Path) -> None:
    ckpt = learned_run / "checkpoints" / "best.ckpt"
    report = run_verb("attack", [f"ckpt_path={ckpt}", "attack=fgsm", "attack.eps=[2/255,8/255]",
                                 "defenses=[none,median]", "detector=true", *SMALL], tmp_path)
    assert report["threat"] == "white-box" and report["kind"] == "multiclass"
    rows = report["rows"]
    assert [(round(r["eps"] * 255), r["defense"]) for r in rows] == [(2, "none"), (2, "median"), (8, "none"), (8, "median")]
    assert rows[2]["adversarial"] <= rows[0]["adversarial"] <= rows[0]["clean"]
    assert rows[2]["linf"] == pytest.approx(8 / 255, abs=1e-6) and 0 <= rows[0]["detection_auc_all"] <= 1
    assert json.loads((tmp_path / "robustness.json").read_text())["rows"] == rows
    table = (tmp_path / "robustness.md").read_text()
    assert "| fgsm | 2/255 | none |" in table and "| fgsm | 8/255 | median |" in table
    for plot in ("eps_curve.png", "adversarial_grid.png"):
        assert (tmp_path / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_from_a_surrogate(learned_run: Path, tmp_path: Path) -> None:
    run_verb("train", [*TINY, "seed=7", "trainer.max_epochs=1"], tmp_path / "surrogate")
    report = run_verb("attack", [f"ckpt_path={learned_run / 'checkpoints' / 'best.ckpt'}",
                                 f"surrogate_ckpt_path={tmp_path / 'surrogate' / 'checkpoints' / 'best.ckpt'}",
                                 "attack.eps=[8/255]", "attack.steps=3", *SMALL], tmp_path / "attack")
    assert report["threat"] == "transfer (black-box)" and report["surrogate"].endswith("best.ckpt")
    assert report["rows"][0]["adversarial"] <= report["rows"][0]["clean"]


@pytest.mark.slow
def test_attack_cli_names_a_missing_checkpoint(tmp_path: Path) -> None:
    result = medsec_cli("attack", f"ckpt_path={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and f"checkpoint not found: {tmp_path / 'none.ckpt'}" in output
    assert "Traceback" not in output
