"""`medsec eval ckpt_path=...`: test a checkpoint and write ``metrics.json`` and plots.

The data set is the one the checkpoint was trained on (stored in it by ``medsec train``) unless
a ``data=...`` override names another one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medsec.core.checkpoint import CHECKPOINT_KEY, CheckpointIO, build_task, read_checkpoint, rebuild_stage
from medsec.crypto.stage import AESStage
from medsec.data.datamodule import MedicalDataModule, build_datamodule
from medsec.errors import ConfigError
from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.ddp import job_scope
from medsec.utils.run import (
    check_sealed_loggers,
    collect_metrics,
    instantiate_list,
    publish_results,
    save_resolved_config,
    user_errors_exit,
)

log = logging.getLogger("medsec.eval")


def open_checkpoint(ckpt_path: str | Path, stage: AESStage | None = None) -> dict[str, Any]:
    """The checked checkpoint (plain data) and its run information (``payload[CHECKPOINT_KEY]``)."""
    return read_checkpoint(ckpt_path, stage)


def load_run(cfg: DictConfig, ckpt_path: str | Path) -> tuple[L.LightningModule, MedicalDataModule, AESStage | None]:
    """The trained task in ``ckpt_path``, its data module (the checkpoint's data config unless
    ``cfg.data`` names one) and the security stage to read them with (``cfg.crypto``, else the one
    the training run used, rebuilt from its key reference)."""
    stage = instantiate(cfg.crypto) if cfg.get("crypto") else None
    payload = open_checkpoint(ckpt_path, stage)
    info = payload[CHECKPOINT_KEY]
    trained_with = info.get("crypto") or {}
    if stage is None and trained_with:
        stage = rebuild_stage(trained_with, f"ckpt_path: {ckpt_path}")  # trained on an encrypted store
    if stage is not None and trained_with.get("encrypt_outputs") and not getattr(stage, "encrypt_outputs", True):
        log.info("sealing outputs, as the training run did (crypto.encrypt_outputs)")
        stage.encrypt_outputs = True
    data_cfg = cfg.data if cfg.get("data") else OmegaConf.create(info["data"])
    datamodule = build_datamodule(data_cfg, stage)
    task = build_task(payload, f"ckpt_path: {ckpt_path}")
    if list(datamodule.class_names) != list(task.class_names):
        raise ConfigError(
            f"data: classes {datamodule.class_names} differ from the checkpoint's {task.class_names}; "
            "fine-tune with `medsec train model.init_from=...` to change the class set")
    return task, datamodule, stage


def evaluate(cfg: DictConfig) -> dict[str, float | None]:
    """Test ``cfg.ckpt_path`` and return the metrics written to ``metrics.json``."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    task, datamodule, stage = load_run(cfg, cfg.ckpt_path)
    loggers = instantiate_list(cfg.get("logger"))
    check_sealed_loggers(stage, loggers)
    with job_scope():
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
                                         logger=loggers, plugins=[CheckpointIO(stage, out_dir)])
        trainer.test(task, datamodule=datamodule)
        metrics = collect_metrics(trainer.callback_metrics)
        if trainer.is_global_zero:
            publish_results(out_dir, metrics, task, stage.output_writer(out_dir) if stage else None, trainer)
    return metrics


@user_errors_exit
def run(cfg: DictConfig) -> dict[str, float | None]:
    return evaluate(cfg)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
