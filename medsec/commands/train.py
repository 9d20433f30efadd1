"""`medsec train`: fit a task on a data module, test the best checkpoint, write the results."""
from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from medsec.core.app import hydra_app
from medsec.core.run import Run
from medsec.utils.callbacks import LogSampleImages, StoreRunInfo
from medsec.utils.ddp import job_scope
from medsec.utils.run import collect_metrics, resolved_config

log = logging.getLogger("medsec.train")


def train(cfg: DictConfig) -> dict[str, float | None]:
    """Train (and by default test) as ``cfg`` says; returns the metrics written to ``metrics.json``."""
    return fit(cfg)[1]


def fit(cfg: DictConfig) -> tuple[Run, dict[str, float | None]]:
    """:func:`train`, also returning the :class:`Run`."""
    run = Run.build(cfg)
    extra = [StoreRunInfo(run.info), *([LogSampleImages()] if cfg.get("log_images") else [])]
    with job_scope():
        trainer = run.trainer(run.callbacks(extra))
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved_config(cfg))
        trainer.fit(run.task, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = dict(trainer.callback_metrics)
        if cfg.get("test"):
            checkpoint = trainer.checkpoint_callback
            best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
            log.info("testing %s", best or "the last weights")
            trainer.test(run.task, datamodule=run.datamodule, ckpt_path=best or None)
        metrics = collect_metrics(fit_metrics, trainer.callback_metrics)
        if trainer.is_global_zero:
            run.publish(metrics, trainer)
    return run, metrics


def train_for_sweeps(cfg: DictConfig) -> float | None:
    """Train and return the monitored metric's best value (what a sweeper optimises)."""
    run, metrics = fit(cfg)
    monitor, _ = run.monitor
    return metrics.get(f"{monitor}_best", metrics.get(monitor))


main = hydra_app("train", train_for_sweeps)

if __name__ == "__main__":
    main()
