"""Lightning callbacks used by the verbs."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid

CHECKPOINT_KEY = "medsec"


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
    """Log ``train/images_per_s`` and ``train/epoch_time_s``: training images per second of the
    training part of each epoch (data loading included, validation excluded)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.perf_counter()
        self.images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.images += len(batch["image"]) * trainer.world_size
        self.last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = max(self.last - self.start, 1e-9)
        pl_module.log_dict({"train/epoch_time_s": elapsed, "train/images_per_s": self.images / elapsed})
