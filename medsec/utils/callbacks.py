"""Lightning callbacks used by the verbs."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid

from medsec.core.checkpoint import CHECKPOINT_KEY


class StoreRunInfo(L.Callback):
    """Store what ``medsec eval`` needs to rebuild a run in every checkpoint: the task class and
    the resolved data config (key *references* only; never key material)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.info


class LogSampleImages(L.Callback):
    """Send a grid of the first validation batch to image-capable loggers. Only added when the
    user sets ``log_images=true``: by default no patient image leaves the machine through a logger."""

    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = batch["image"][: self.max_images].detach().float().cpu()
        if images.ndim == 5:  # 3D: show the middle slice
            images = images[..., images.shape[-1] // 2]
        grid = make_grid(images[:, :3], nrow=8, normalize=False).clamp(0, 1)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/samples", [grid], step=trainer.global_step)



class TrainThroughput(L.Callback):
    """Training throughput: logs ``train/images_per_s`` and ``train/epoch_time_s`` each epoch (data
    loading included, validation excluded) and, given a ``path``, writes every epoch's wall and
    process-CPU seconds and image count there as JSON when fitting ends (the benchmarks use it)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.epochs: list[dict[str, float]] = []
        self._t0: float | None = None
        self._c0 = 0.0
        self._in_epoch = False
        self._seconds = 0.0
        self._cpu_seconds = 0.0
        self._images = 0

    def _resume(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def _pause(self) -> None:
        if self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
            self._cpu_seconds += time.process_time() - self._c0
            self._t0 = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch, self._seconds, self._cpu_seconds, self._images = True, 0.0, 0.0, 0
        self._resume()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        self._images += len(images)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._in_epoch:
            self._resume()  # training goes on (or the epoch ends right away)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        self._in_epoch = False
        self.epochs.append({"seconds": self._seconds, "cpu_seconds": self._cpu_seconds,
                            "images": self._images})
        seconds = max(self._seconds, 1e-9)
        pl_module.log_dict({"train/epoch_time_s": seconds,
                            "train/images_per_s": self._images * trainer.world_size / seconds})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"epochs": self.epochs}, indent=2) + "\n")
