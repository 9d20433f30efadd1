"""`medsec train` / `medsec eval` end to end on tiny synthetic data, in-process."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from medsec.errors import ConfigError
from tests.conftest import TINY, read_metrics, run_verb


def test_run_directory_has_everything(trained_run: Path) -> None:
    metrics = read_metrics(trained_run)
    for key in ("test/auroc", "test/acc", "test/f1", "test/loss", "val/auroc", "val/auroc_best", "val/acc_best",
                "train/loss", "test/auroc_healthy", "test/auroc_disc", "test/auroc_ring"):
        assert key in metrics, key
    assert all("/" in k for k in metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["train/images_per_s"] > 0 and metrics["train/epoch_time_s"] > 0
    assert metrics["val/auroc_best"] >= metrics["val/auroc"] - 1e-9
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert "val/auroc" in (trained_run / "csv" / "metrics.csv").read_text().splitlines()[0]
    for plot in ("roc_curves.png", "confusion_matrix.png"):
        assert (trained_run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["paths"]["output_dir"] == str(trained_run)
    assert "${" not in (trained_run / "config.yaml").read_text()  # resolved


def test_predictions_csv_has_one_row_per_test_image(trained_run: Path) -> None:
    import pandas as pd

    frame = pd.read_csv(trained_run / "predictions.csv")
    assert len(frame) == 64 and frame["id"].is_unique
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape[1] == 3 and abs(probs.sum(axis=1) - 1).max() < 1e-4
    accuracy = (probs.argmax(axis=1) == frame["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(read_metrics(trained_run)["test/acc"], abs=1e-6)


def test_checkpoint_rebuilds_without_config(trained_run: Path) -> None:
    from medsec.tasks import ClassificationTask

    task = ClassificationTask.load_from_checkpoint(trained_run / "checkpoints" / "best.ckpt", map_location="cpu")
    assert task.class_names == ["healthy", "disc", "ring"]
    probs = task.probabilities(task(torch.rand(4, 1, 24, 24)))
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    # plain containers only: the checkpoint loads with torch's safe weights-only unpickler
    torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)


def test_eval_reproduces_the_test_metrics(trained_run: Path, tmp_path: Path) -> None:
    metrics = run_verb("eval", [f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                                "callbacks.rich_progress_bar=null"], tmp_path)
    trained = read_metrics(trained_run)
    assert read_metrics(tmp_path) == metrics
    for key in ("test/auroc", "test/acc", "test/loss"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    assert (tmp_path / "plots" / "roc_curves.png").is_file()


def test_an_output_dir_that_does_not_exist_yet_is_made(trained_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "new" / "run"  # `medsec eval paths.output_dir=...` from a shell, before any mkdir
    metrics = run_verb("eval", [f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", f"paths.output_dir={target}",
                                "callbacks.rich_progress_bar=null"], tmp_path / "hydra")
    assert read_metrics(target) == metrics and (target / "config.yaml").is_file()


def test_eval_rejects_other_class_set(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="differ from the checkpoint"):
        run_verb("eval", [f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", "data=synthetic",
                          "data.source.num_classes=4", "data.source.num_samples=[8,8,8]"], tmp_path)


def test_eval_names_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint not found: .*nope.ckpt"):
        run_verb("eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)


def test_eval_names_a_foreign_file(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(ConfigError, match="not written by `medsec train`"):
        run_verb("eval", [f"ckpt_path={bogus}"], tmp_path / "out")


def test_multilabel_run(tmp_path: Path) -> None:
    metrics = run_verb("train", [*TINY, "data.source.multilabel=true", "data.source.num_classes=3"], tmp_path)
    assert {"test/auroc_disc", "test/auroc_ring", "test/auroc_square"} <= set(metrics)
    assert not any(k.endswith("healthy") for k in metrics)
    assert (tmp_path / "plots" / "confusion_matrix.png").is_file()


def test_fine_tune_replaces_head_and_freezes_backbone(trained_run: Path, tmp_path: Path) -> None:
    from medsec.tasks import ClassificationTask

    source = ClassificationTask.load_from_checkpoint(trained_run / "checkpoints" / "best.ckpt", map_location="cpu")
    run_verb("train", [*TINY, "data.source.num_classes=4", "trainer.max_epochs=1",
                       f"model.init_from={trained_run / 'checkpoints' / 'best.ckpt'}", "model.freeze_backbone=true"],
             tmp_path)
    tuned = ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert tuned.class_names == ["healthy", "disc", "ring", "square"]
    assert tuned.net.head.out_features == 4
    for (name, before), after in zip(source.net.backbone.state_dict().items(), tuned.net.backbone.state_dict().values()):
        torch.testing.assert_close(before, after, msg=f"frozen backbone changed: {name}")


def test_fine_tune_trains_backbone_when_not_frozen(trained_run: Path, tmp_path: Path) -> None:
    from medsec.tasks import ClassificationTask

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    source = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu")
    run_verb("train", [*TINY, "trainer.max_epochs=1", f"model.init_from={ckpt}"], tmp_path)
    tuned = ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    first = next(iter(source.net.backbone.state_dict()))
    assert not torch.equal(source.net.backbone.state_dict()[first], tuned.net.backbone.state_dict()[first])


def test_missing_init_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.init_from: checkpoint not found: .*missing.ckpt"):
        run_verb("train", [*TINY, f"model.init_from={tmp_path / 'missing.ckpt'}"], tmp_path)


def test_balanced_class_weights(tmp_path: Path) -> None:
    metrics = run_verb("train", [*TINY, "trainer.max_epochs=1", "task.class_weights=balanced"], tmp_path)
    assert math.isfinite(metrics["train/loss"])


def test_folder_of_mixed_formats_trains(tmp_path: Path) -> None:
    """PNG, DICOM and NIfTI files in class folders go through LoadImage into training and eval."""
    from tests.data.fakes import write_dicom, write_nifti, write_png

    root = tmp_path / "images"
    for cls in ("normal", "abnormal"):
        for i in range(6):
            write_png(root / cls / f"{i}.png")
            write_dicom(root / cls / f"{i}.dcm")
            write_nifti(root / cls / f"{i}.nii.gz")
    metrics = run_verb("train", ["data=folder", f"data.source.root={root}", "data.image_size=24", "data.num_workers=0",
                                 "data.batch_size=8", "model.net.width=4", "trainer.max_epochs=1",
                                 "callbacks.rich_progress_bar=null"], tmp_path / "run")
    assert "test/auroc_normal" in metrics and "test/auroc_abnormal" in metrics


def test_best_checkpoint_follows_the_configured_monitor(tmp_path: Path) -> None:
    import csv

    run_verb("train", [*TINY, "trainer.max_epochs=3", "monitor=val/loss", "monitor_mode=min"], tmp_path)
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    losses = [float(r["val/loss"]) for r in rows]
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == losses.index(min(losses))
