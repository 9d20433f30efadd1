"""`medsec eval ckpt_path=...`: test a checkpoint and write ``metrics.json`` and plots.

The data set is the one the checkpoint was trained on (stored in it by ``medsec train``) unless
a ``data=...`` override names another one.
"""
from __future__ import annotations

from omegaconf import DictConfig

from medsec.core.app import hydra_app
from medsec.core.run import Run
from medsec.utils.ddp import job_scope
from medsec.utils.run import collect_metrics


def evaluate(cfg: DictConfig) -> dict[str, float | None]:
    """Test ``cfg.ckpt_path`` and return the metrics written to ``metrics.json``."""
    run = Run.open(cfg)
    with job_scope():
        trainer = run.trainer()
        trainer.test(run.task, datamodule=run.datamodule)
        metrics = collect_metrics(trainer.callback_metrics)
        if trainer.is_global_zero:
            run.publish(metrics, trainer)
    return metrics


main = hydra_app("eval", evaluate)

if __name__ == "__main__":
    main()
