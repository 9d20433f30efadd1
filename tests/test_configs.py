"""Every config composes, and every recipe builds its data module and task (lightning-hydra-template style)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medsec.utils.config import CONFIG_DIR, compose_config, default_data_dir


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "model", "data", "debug", "hparams_search"])
def test_every_option_composes(group: str, tmp_path: Path) -> None:
    for option in options(group):
        overrides = [f"{group}={option}"] + (["data.source.root=/somewhere"] if option == "folder" else [])
        cfg = compose_config("train", overrides, output_dir=tmp_path)
        OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_builds_task(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"experiment={experiment}"], output_dir=tmp_path)
    assert OmegaConf.select(cfg, "data.source._target_")
    root = Path(str(OmegaConf.select(cfg, "data.source.root", default=default_data_dir())))
    if not root.exists():
        pytest.skip(f"real data not found at {root}")
    datamodule = instantiate(cfg.data)
    task = instantiate(OmegaConf.to_container(cfg.task, resolve=True), _convert_="all", **datamodule.task_info())
    assert task.hparams.num_classes == datamodule.num_classes

