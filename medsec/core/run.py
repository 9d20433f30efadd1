"""`Run`: the one object every command works through.

``Run.build(cfg)`` composes a new run (protections, data, task) from a config; ``Run.open(cfg)``
rebuilds a trained run from ``cfg.ckpt_path`` (weights-only, registry-checked: see
:mod:`medsec.core.checkpoint`). Either gives a trainer with medsec's checkpoint I/O and the
protections' callbacks, a writer that seals when a protection says so, and batches of a split.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from medsec import __version__
from medsec.core.checkpoint import (
    CHECKPOINT_KEY,
    CheckpointIO,
    build_task,
    read_checkpoint,
    rebuild_protection,
)
from medsec.core.contracts import Protections
from medsec.core.registry import safe_instantiate
from medsec.data.datamodule import MedicalDataModule, build_datamodule
from medsec.errors import ConfigError
from medsec.utils.outputs import OutputWriter
from medsec.utils.run import check_sealed_loggers, instantiate_list, publish_results, save_resolved_config

log = logging.getLogger("medsec")
Batches = list[tuple[torch.Tensor, torch.Tensor]]
MONITORED = (ModelCheckpoint, EarlyStopping)


@dataclass
class Run:
    """A configured run: its config, run directory, task, data and protections."""

    cfg: DictConfig
    out_dir: Path
    task: L.LightningModule
    datamodule: MedicalDataModule
    protections: Protections
    info: dict[str, Any]
    """What the checkpoint stores to rebuild the run (task class, data config, protections)."""

    @classmethod
    def build(cls, cfg: DictConfig) -> Run:
        """A new run from ``cfg`` (data, model, task, protections, seed)."""
        out_dir = cls._start(cfg)
        protections = Protections.from_config(cfg.get("protect"), cfg.get("crypto"))
        if protections.confidential and cfg.get("log_images"):
            raise ConfigError("log_images=true would send decrypted images to the loggers; it is refused with "
                              f"protect={protections.names}")
        datamodule = build_datamodule(cfg.data, protections)
        task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
        protections.check(datamodule.task_info(), task_cfg.get("_target_", ""))
        task = safe_instantiate(task_cfg, "task", ("task", "network", "optimizer", "scheduler"), _convert_="all",
                                **datamodule.task_info())
        task.initialize_weights()
        protections.configure_model(task)
        info = {"task_target": task_cfg["_target_"], "data": OmegaConf.to_container(cfg.data, resolve=True),
                "protect": protections.stored(), "medsec_version": __version__}  # key references only
        return cls(cfg, out_dir, task, datamodule, protections, info)

    @classmethod
    def open(cls, cfg: DictConfig, ckpt_path: str | Path | None = None, read_data: bool = True) -> Run:
        """The trained run in ``ckpt_path`` (default ``cfg.ckpt_path``): its task, its data (the
        checkpoint's data config unless ``cfg.data`` names one) and the protections to read them
        with (``cfg.protect``/``cfg.crypto``, else those the training run used); ``read_data``: as
        :meth:`open_checkpoint`."""
        out_dir = cls._start(cfg)
        return cls.open_checkpoint(cfg, ckpt_path or cfg.ckpt_path, out_dir, read_data)

    @classmethod
    def open_checkpoint(cls, cfg: DictConfig, ckpt_path: str | Path, out_dir: Path, read_data: bool = True) -> Run:
        """:meth:`open` without starting a run directory (a second checkpoint in the same run).
        ``read_data=False``: build the data module (its transforms) without reading its source nor
        checking its classes (``medsec predict`` reads other inputs)."""
        where = f"ckpt_path: {ckpt_path}"
        protections = Protections.from_config(cfg.get("protect"), cfg.get("crypto"))
        payload = read_checkpoint(ckpt_path, protections.sealer)
        info = payload[CHECKPOINT_KEY]
        stored = info.get("protect") or []
        if not protections:
            protections = Protections(rebuild_protection(entry, where) for entry in stored)
        sealer, trained = protections.sealer, next((e for e in stored if e.get("encrypt_outputs")), None)
        if sealer is not None and trained is not None and not sealer.encrypt_outputs:
            log.info("sealing outputs, as the training run did (encrypt_outputs)")
            sealer.encrypt_outputs = True
        data_cfg = cfg.data if cfg.get("data") else OmegaConf.create(info["data"])
        datamodule = build_datamodule(data_cfg, protections)
        task = build_task(payload, where)
        if read_data and list(datamodule.class_names) != list(task.class_names):
            raise ConfigError(f"data: classes {datamodule.class_names} differ from the checkpoint's {task.class_names}; "
                              "fine-tune with `medsec train model.init_from=...` to change the class set")
        return cls(cfg, out_dir, task, datamodule, protections, dict(info))

    @staticmethod
    def _start(cfg: DictConfig) -> Path:
        L.seed_everything(cfg.seed, workers=True)
        out_dir = Path(cfg.paths.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)  # paths.output_dir=... from the command line may not exist yet
        save_resolved_config(cfg, out_dir)
        return out_dir

    @property
    def monitor(self) -> tuple[str, str]:
        """The metric that picks the best checkpoint and its mode: ``cfg.monitor`` when set, else
        the task's own."""
        monitor = self.cfg.get("monitor") or getattr(self.task, "monitor", None)
        mode = self.cfg.get("monitor_mode") or getattr(self.task, "mode", "max")
        if not monitor:
            raise ConfigError(f"monitor: {type(self.task).__name__} declares no metric; set monitor=stage/name")
        return monitor, mode

    def callbacks(self, extra: Sequence[L.Callback] = ()) -> list[L.Callback]:
        """The configured callbacks (checkpointing and early stopping on the run's monitor), the
        protections' callbacks and ``extra``."""
        monitor, mode = self.monitor if self.cfg.get("task") is not None else (None, None)
        callbacks = []
        for entry in (self.cfg.get("callbacks") or {}).values():
            if not isinstance(entry, DictConfig) or "_target_" not in entry:
                continue
            if monitor and entry.get("monitor", "") is None:
                entry = entry.copy()
                with open_dict(entry):
                    entry.monitor, entry.mode = monitor, mode
            callbacks.append(safe_instantiate(entry, "callbacks", ("runtime",)))
        return [*callbacks, *self.protections.callbacks(), *extra]

    def trainer(self, callbacks: Sequence[L.Callback] | None = None) -> L.Trainer:
        """A Lightning trainer for this run: medsec's checkpoint I/O (weights-only reads, sealing
        when a protection seals), the configured loggers (refused if they cannot be sealed), and the
        options the protections need."""
        loggers = instantiate_list(self.cfg.get("logger"))
        check_sealed_loggers(self.protections.sealer, loggers)
        callbacks = list(callbacks if callbacks is not None else self.callbacks())
        if not loggers:  # Lightning refuses a learning-rate monitor without a logger to send it to
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        return instantiate(self.cfg.trainer, callbacks=callbacks,
                           logger=loggers, plugins=[CheckpointIO(self.protections.sealer, self.out_dir)],
                           **self.protections.trainer_options())

    @property
    def writer(self) -> OutputWriter:
        """Where this run's outputs go: sealed when a protection encrypts outputs."""
        return self.protections.output_writer(self.out_dir)

    def publish(self, metrics: dict[str, float | None], trainer: L.Trainer | None = None) -> None:
        """``metrics.json`` and the task's test outputs, through :attr:`writer`."""
        publish_results(self.out_dir, metrics, self.task, self.writer, trainer)

    def batches(self, split: str, max_images: int) -> Batches:
        """Up to ``max_images`` (images, target) pairs of ``split`` (``train`` or ``test``), in batches."""
        self.datamodule.setup(None)
        loader = {"train": self.datamodule.train_dataloader, "test": self.datamodule.test_dataloader}[split]()
        batches, count = [], 0
        for batch in loader:
            keep = min(len(batch["image"]), max_images - count)
            batches.append((batch["image"][:keep], batch.get("label", batch.get("mask"))[:keep]))
            count += keep
            if count >= max_images:
                break
        return batches

    def images(self, split: str, max_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batches` concatenated: (images, targets)."""
        batches = self.batches(split, max_images)
        return torch.cat([images for images, _ in batches]), torch.cat([targets for _, targets in batches])
