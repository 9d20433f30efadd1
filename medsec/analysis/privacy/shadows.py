"""Shadow models for LiRA: fresh copies of a trained task, each trained on a random half of the
audit pool, and the per-example statistics of any task (its own or a shadow)."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from torch.utils.data import DataLoader, StackDataset

from medsec.analysis.privacy.membership import logit_confidence
from medsec.tasks.base import BaseTask

QUIET_WARNINGS = (".*does not have many workers.*", ".*number of training batches.*",
                  ".*`validation_step` but have no `val_dataloader`.*")
"""Lightning's advice on loaders, irrelevant to a shadow model trained in memory."""


def sample_statistics(task: BaseTask, images: torch.Tensor, targets: torch.Tensor,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample loss, LiRA statistic) of every example under ``task``, in evaluation mode.

    The statistic is :func:`logit_confidence` for class logits ``(N, C)`` with class-index targets
    (a multi-class model), the negative per-sample loss otherwise. A task without a per-sample loss
    raises its ``ConfigError``."""
    task.eval()
    losses, stats = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs = task(images[start:start + batch_size])
            target = targets[start:start + batch_size]
            loss = task.sample_loss(outputs, target).float()
            multiclass = outputs.ndim == 2 and target.ndim == 1 and not target.is_floating_point()
            losses.append(loss)
            stats.append(logit_confidence(outputs, target) if multiclass else -loss)
    return torch.cat(losses).numpy().astype(np.float64), torch.cat(stats).numpy().astype(np.float64)


def shadow_membership(k: int, n: int, seed: int) -> np.ndarray:
    """``in_shadow[k, n]``: every example is in the training set of ``k // 2`` shadows, chosen at random."""
    order = np.random.default_rng(seed).random((k, n)).argsort(0)
    return order < k // 2


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Without Lightning's per-trainer banner (accelerators found) and loader advice."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.setLevel(level)


def train_shadow(task: BaseTask, images: torch.Tensor, targets: torch.Tensor, epochs: int, batch_size: int,
                 seed: int) -> BaseTask:
    """A fresh copy of ``task`` (same class and hyper-parameters, new weights from ``seed``) trained
    for ``epochs`` on ``images``: no protections, no validation, no checkpoints."""
    torch.manual_seed(seed)
    shadow = type(task)(**task.hparams)  # the hyper-parameters the checkpoint's task was checked and built from
    data = StackDataset(image=images, label=targets)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(shadow, train_dataloaders=loader)
    return shadow


def train_shadows(task: BaseTask, images: torch.Tensor, targets: torch.Tensor, k: int, epochs: int,
                  batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train ``k`` shadows of ``task``, each on its half of the pool (:func:`shadow_membership`),
    and score the whole pool with each: (statistics ``(k, n)``, ``in_shadow`` ``(k, n)``)."""
    in_shadow = shadow_membership(k, len(images), seed)
    stats = np.empty(in_shadow.shape)
    with _quiet_lightning():
        for index in track(range(k), description="shadow models", transient=True, console=Console(stderr=True)):
            chosen = torch.from_numpy(np.flatnonzero(in_shadow[index]))
            shadow = train_shadow(task, images[chosen], targets[chosen], epochs, batch_size, seed + 1 + index)
            stats[index] = sample_statistics(shadow, images, targets, batch_size)[1]
    return stats, in_shadow
