"""`medsec eval ckpt_path=...`: test a checkpoint and write ``metrics.json`` and plots.

The data set is the one the checkpoint was trained on (stored in it by ``medsec train``) unless
a ``data=...`` override names another one.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from medsec.crypto.stage import AESStage, checkpoint_file
from medsec.data.datamodule import MedicalDataModule, build_datamodule
from medsec.errors import ConfigError
from medsec.utils.callbacks import CHECKPOINT_KEY
from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.ddp import job_scope
from medsec.utils.run import collect_metrics, instantiate_list, publish_results, save_resolved_config, user_errors_exit

log = logging.getLogger("medsec.eval")


def open_checkpoint(ckpt_path: str | Path, stage: AESStage | None = None) -> tuple[dict[str, Any], Path | io.BytesIO]:
    """The run information ``medsec train`` stored in a checkpoint, and the checkpoint to load the
    task from (the file, or its decrypted bytes in memory when it is sealed)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint not found: {path}")
    source = checkpoint_file(path, stage)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or CHECKPOINT_KEY not in payload:
        raise ConfigError(f"ckpt_path: {path} was not written by `medsec train` (no '{CHECKPOINT_KEY}' entry)")
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return payload[CHECKPOINT_KEY], source


def load_run(cfg: DictConfig, ckpt_path: str | Path) -> tuple[L.LightningModule, MedicalDataModule, AESStage | None]:
    """The trained task in ``ckpt_path``, its data module (the checkpoint's data config unless
    ``cfg.data`` names one) and the security stage to read them with (``cfg.crypto``, else the one
    the training run used)."""
    stage = instantiate(cfg.crypto) if cfg.get("crypto") else None
    info, checkpoint = open_checkpoint(ckpt_path, stage)
    trained_with = info.get("crypto") or {}
    if stage is None and trained_with:
        stage = instantiate(trained_with)  # trained on an encrypted store: read it the same way
    if stage is not None and trained_with.get("encrypt_outputs") and not stage.encrypt_outputs:
        log.info("sealing outputs, as the training run did (crypto.encrypt_outputs)")
        stage.encrypt_outputs = True
    data_cfg = cfg.data if cfg.get("data") else OmegaConf.create(info["data"])
    datamodule = build_datamodule(data_cfg, stage)
    task = get_class(info["task_target"]).load_from_checkpoint(checkpoint, map_location="cpu")
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
    with job_scope():
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
                                         logger=instantiate_list(cfg.get("logger")))
        trainer.test(task, datamodule=datamodule)
        metrics = collect_metrics(trainer.callback_metrics)
        if trainer.is_global_zero:
            publish_results(out_dir, metrics, task, stage.output_writer(out_dir) if stage else None)
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
