"""Loggers: W&B stays offline and never waits for a network; images reach a logger only on request."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY, run_verb

ONE_EPOCH = [*TINY, "trainer.max_epochs=1"]


def _tensorboard_tags(run_dir: Path) -> dict[str, set[str]]:
    """Scalar and image tags over every event file of the run (fit and test write one each)."""
    tags: dict[str, set[str]] = {"scalars": set(), "images": set()}
    for events in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    return tags


@pytest.mark.parametrize("log_images", [False, True])
def test_tensorboard_images_only_on_request(tmp_path: Path, log_images: bool) -> None:
    run_verb("train", [*ONE_EPOCH, "logger=tensorboard", f"log_images={str(log_images).lower()}"], tmp_path)
    tags = _tensorboard_tags(tmp_path)
    assert "val/auroc" in tags["scalars"]
    assert ("val/samples" in tags["images"]) is log_images
    assert len(tags["images"]) == int(log_images)


@pytest.mark.parametrize("log_images", [False, True])
def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_images: bool) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_verb("train", [*ONE_EPOCH, "logger=many", f"log_images={str(log_images).lower()}"], tmp_path)
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))
    images = list(offline_run.rglob("media/images/*"))
    assert bool(images) is log_images
    assert (tmp_path / "metrics.json").is_file()


def test_training_without_a_logger(tmp_path: Path) -> None:
    """``logger=none`` keeps the default callbacks but drops the learning-rate monitor, which Lightning
    refuses without a logger; training and testing still write metrics.json."""
    metrics = run_verb("train", [*ONE_EPOCH, "logger=none"], tmp_path)
    assert 0 <= metrics["test/auroc"] <= 1 and (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "csv").exists()
