"""`medsec audit`: membership inference against checkpoints trained here on synthetic images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from medsec.commands.audit import audit_pool, matched_choice
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.utils.config import compose_config
from tests.conftest import TINY, run_verb

OVERFIT = [*(o for o in TINY if not o.startswith(("data.source.num_samples", "model.net.width", "trainer.max_epochs"))),
           "data.source.num_samples=[64,16,64]", "data.augment=false", "model.net.width=16",
           "trainer.max_epochs=30", "monitor=epoch", "monitor_mode=max", "test=false"]
"""64 training images, 30 epochs, and the checkpoint of the last epoch (``monitor=epoch``): a model
that has memorised its training set (training loss about 0.05, validation loss about 0.5)."""
UNSEEN = ["data=synthetic", "data.source.seed=1", "data.source.num_samples=[256,16,256]", "data.source.image_size=24",
          "data.num_workers=0", "audit.members=256"]
"""The same kind of images, drawn from another seed: neither split was trained on."""


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("overfit")
    run_verb("train", OVERFIT, out)
    return out / "checkpoints" / "best.ckpt"


def test_the_loss_attack_finds_the_members_of_an_overfit_model(overfit: Path, tmp_path: Path) -> None:
    """Measured AUC 0.944 (64 members, 64 non-members). Without membership signal the AUC's
    standard deviation is 0.05 here, so 0.8 is six of them above chance."""
    report = run_verb("audit", [f"ckpt_path={overfit}", "audit.attacks=[loss]"], tmp_path)
    loss = report["attacks"]["loss"]
    assert loss["auc"] > 0.8
    # class-matched pools: as many of each class as both splits hold (56 of the 64 here)
    assert loss["epsilon"]["lower"] > 1 and loss["epsilon"]["members"] == loss["epsilon"]["non_members"]
    assert 48 <= loss["epsilon"]["members"] == report["members"] <= 64
    assert report["delta"] == pytest.approx(1 / 64) and report["claimed"] is None and report["shadows"] == 0
    assert "dp_tpr_bound" not in loss


def test_unseen_members_look_like_non_members(overfit: Path, tmp_path: Path) -> None:
    """The control: the same model audited on 256 "members" and 256 non-members it has never seen
    (another seed of the synthetic source, same distribution). Only a difference between training
    and non-training images can move the AUC from 0.5; with 256 a side its standard deviation under
    no difference is 0.026, and 0.1 is four of them. Measured: 0.475 (seeds 2 and 3: 0.510, 0.490).
    A model trained on random labels would not do: it memorises its members, the opposite of a control."""
    report = run_verb("audit", [f"ckpt_path={overfit}", "audit.attacks=[loss]", *UNSEEN], tmp_path)
    assert 200 <= report["members"] == report["non_members"] <= 256  # class-matched (241 here)
    assert report["attacks"]["loss"]["auc"] == pytest.approx(0.5, abs=0.1)


def test_lira_writes_the_report_and_checks_the_claimed_epsilon(overfit: Path, tmp_path: Path) -> None:
    """LiRA with two shadows, and a claimed epsilon read from the training run's metrics.json: a
    model that memorised its training set proves more than epsilon = 0.5."""
    run_dir = tmp_path / "dp_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = Path(shutil.copy(overfit, run_dir / "checkpoints" / "best.ckpt"))
    (run_dir / "metrics.json").write_text(json.dumps({"dp/epsilon": 0.5, "dp/delta": 1e-5}))
    out = tmp_path / "audit"
    report = run_verb("audit", [f"ckpt_path={ckpt}", "audit.shadows=2", "audit.shadow_epochs=5"], out)

    assert report == json.loads((out / "audit.json").read_text())
    assert set(report) >= {"checkpoint", "members", "non_members", "shadows", "shadow_epochs", "delta", "confidence",
                           "claimed", "attacks"}
    assert report["claimed"] == {"epsilon": 0.5, "source": str(run_dir / "metrics.json")}
    assert report["delta"] == 1e-5 and report["shadows"] == 2 and report["shadow_epochs"] == 5
    assert list(report["attacks"]) == ["loss", "lira"]
    for name, result in report["attacks"].items():
        assert set(result) == {"auc", "tpr_at_fpr", "epsilon", "dp_tpr_bound", "within_dp_bound", "shadows"}
        assert set(result["tpr_at_fpr"]) == set(result["dp_tpr_bound"]) == {"0.001", "0.01"}
        assert set(result["epsilon"]) == {"lower", "point", "threshold", "true_positives", "false_positives",
                                          "members", "non_members", "delta", "confidence"}
        assert 0 <= result["auc"] <= 1 and result["shadows"] == (2 if name == "lira" else 0)
    assert report["attacks"]["loss"]["within_dp_bound"] is False
    assert report["attacks"]["loss"]["dp_tpr_bound"]["0.001"] == pytest.approx(0.001 * 1.6487 + 1e-5, rel=1e-4)

    table = (out / "audit.md").read_text()
    assert "| attack | AUC | TPR@0.1% FPR | TPR@1% FPR | empirical eps lower bound |" in table
    assert "| loss |" in table and "| lira |" in table and "**exceeded**" in table
    assert (out / "plots" / "audit_roc.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def open_run(overrides: list[str], tmp_path: Path) -> Run:
    cfg = compose_config("audit", overrides, tmp_path)
    try:
        return Run.open(cfg)
    finally:
        GlobalHydra.instance().clear()


def scaled(records: list[dict]) -> torch.Tensor:
    """The records' images scaled to [0, 1] as every pipeline does (min-max for float images)."""
    raw = torch.stack([torch.as_tensor(record["image"]) for record in records])
    low, high = raw.amin((1, 2, 3), keepdim=True), raw.amax((1, 2, 3), keepdim=True)
    return (raw - low) / (high - low)


def matches(images: torch.Tensor, references: torch.Tensor) -> list[int]:
    """For each image, the index of the one reference it equals (an error if not exactly one)."""
    found = [torch.isclose(references, image, atol=1e-6).flatten(1).all(1).nonzero().flatten() for image in images]
    assert all(len(index) == 1 for index in found)
    return [int(index) for index in found]


def test_members_are_read_without_augmentation(overfit: Path, tmp_path: Path) -> None:
    """With ``data.augment=true`` the training loader flips and warps; the audited training images
    are the records themselves."""
    run = open_run([f"ckpt_path={overfit}", *UNSEEN, "data.augment=true"], tmp_path)
    assert run.datamodule.augment
    records = run.datamodule.data.splits["train"]
    images, labels = audit_pool(run, records, np.arange(16), "train", batch_size=8)
    assert [records[i]["label"] for i in matches(images, scaled(records))] == labels.tolist()


def test_members_come_from_the_records_trained_on(overfit: Path, tmp_path: Path) -> None:
    """A run trained on ``data.train_subset`` records is audited on those, not on the whole split."""
    overrides = [f"ckpt_path={overfit}", *UNSEEN, "data.train_subset=20"]
    run = open_run(overrides, tmp_path / "open")
    trained = run.datamodule.records("train")
    assert len(trained) == 20 < len(run.datamodule.data.splits["train"])
    members, _ = matched_choice(trained, run.datamodule.records("test"), 20, seed=0)
    images, _ = audit_pool(run, trained, members, "train", batch_size=8)
    assert sorted(matches(images, scaled(trained))) == sorted(members.tolist())
    report = run_verb("audit", [*overrides, "audit.attacks=[loss]"], tmp_path / "audit")
    assert report["members"] <= report["training_examples"] == 20 and report["delta"] == pytest.approx(1 / 20)


def test_members_and_non_members_have_the_same_class_mix() -> None:
    """Members 90 % class 1, non-members 60 %: the pools keep as many of each class as both have, so
    a loss attack cannot score the class prior instead of membership."""
    train = [{"label": int(i % 10 != 0)} for i in range(200)]
    test = [{"label": int(i % 5 < 3)} for i in range(100)]
    members, non_members = matched_choice(train, test, 500, seed=0)
    member_labels = sorted(train[i]["label"] for i in members)
    assert member_labels == sorted(test[i]["label"] for i in non_members)
    assert member_labels.count(0) == 20 and member_labels.count(1) == 60  # min(20, 40) and min(180, 60)
    members, non_members = matched_choice(train, test, 40, seed=0)
    assert len(members) == len(non_members) == 40 and len(set(members.tolist())) == 40


@pytest.mark.parametrize(("override", "message"), [
    ("audit.attacks=[loss,shokri]", r"audit.attacks: unknown attack \['shokri'\]; choose from \['loss', 'lira'\]"),
    ("audit.attacks=[]", "audit.attacks must be a non-empty list"),
    ("audit.attacks=loss", "audit.attacks must be a non-empty list, got 'loss'"),
    ("audit.shadows=-1", "audit.shadows must be an integer of at least 0"),
    ("audit.shadows=1", "audit.shadows: lira needs at least 2 shadow models"),
    ("audit.members=0", "audit.members must be an integer of at least 1"),
    ("audit.shadow_epochs=0", "audit.shadow_epochs must be an integer of at least 1"),
    ("audit.fpr=[0.01,1.5]", r"audit.fpr must be in \(0, 1\), got 1.5"),
    ("audit.fpr=[]", "audit.fpr must be a non-empty list"),
    ("audit.confidence=1", r"audit.confidence must be in \(0, 1\)"),
    ("audit.delta=-0.1", r"audit.delta must be in \[0, 1\)"),
    ("audit.epsilon=-1", "audit.epsilon must be a number of at least 0"),
])
def test_bad_settings_are_named(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        run_verb("audit", ["ckpt_path=never_read.ckpt", override], tmp_path)


def test_a_task_without_a_per_sample_loss_cannot_be_audited(tmp_path: Path) -> None:
    run_verb("train", ["experiment=denoising_synthetic", "data.source.num_samples=[16,8,8]", "data.source.image_size=16",
                       "model.net.depth=3", "model.net.features=8", "trainer.max_epochs=1", "test=false",
                       "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"], tmp_path / "train")
    with pytest.raises(ConfigError, match="DenoisingTask declares no per-sample loss; a membership audit needs"):
        run_verb("audit", [f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'best.ckpt'}"], tmp_path / "audit")
