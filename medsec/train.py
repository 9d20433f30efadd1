"""`medsec train`: fit a task on a data module, test the best checkpoint, write the results."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from medsec import __version__
from medsec.core.checkpoint import CheckpointIO
from medsec.data.datamodule import build_datamodule
from medsec.errors import ConfigError
from medsec.utils.callbacks import LogSampleImages, StoreRunInfo
from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.ddp import job_scope
from medsec.utils.run import (
    check_sealed_loggers,
    collect_metrics,
    instantiate_list,
    publish_results,
    resolved_config,
    save_resolved_config,
    user_errors_exit,
)

log = logging.getLogger("medsec.train")


def train(cfg: DictConfig) -> dict[str, float | None]:
    """Train (and by default test) as ``cfg`` says; returns the metrics written to ``metrics.json``."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)

    stage = instantiate(cfg.crypto) if cfg.get("crypto") else None
    if stage is not None and cfg.get("log_images"):
        raise ConfigError("log_images=true would send decrypted images to the loggers; it is refused with crypto")
    datamodule = build_datamodule(cfg.data, stage)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task = instantiate(task_cfg, _convert_="all", **datamodule.task_info())
    task.initialize_weights()

    callbacks = instantiate_list(cfg.get("callbacks"))
    callbacks.append(StoreRunInfo({
        "task_target": task_cfg["_target_"],
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "crypto": OmegaConf.to_container(cfg.crypto, resolve=True) if stage else None,  # key reference only
        "medsec_version": __version__,
    }))
    if cfg.get("log_images"):
        callbacks.append(LogSampleImages())
    loggers = instantiate_list(cfg.get("logger"))
    check_sealed_loggers(stage, loggers)
    with job_scope():
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                                         plugins=[CheckpointIO(stage, out_dir)])
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved_config(cfg))
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = dict(trainer.callback_metrics)
        if cfg.get("test"):
            checkpoint = trainer.checkpoint_callback
            best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
            log.info("testing %s", best or "the last weights")
            trainer.test(task, datamodule=datamodule, ckpt_path=best or None)
        metrics = collect_metrics(fit_metrics, trainer.callback_metrics)
        if trainer.is_global_zero:
            publish_results(out_dir, metrics, task, stage.output_writer(out_dir) if stage else None, trainer)
    return metrics


@user_errors_exit
def run(cfg: DictConfig) -> float | None:
    """Train and return the monitored metric (what a sweeper optimises)."""
    metrics = train(cfg)
    return metrics.get(f"{cfg.monitor}_best", metrics.get(cfg.monitor))


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
