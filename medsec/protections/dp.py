"""Differential privacy in training: DP-SGD (Abadi et al. 2016) with Opacus, through the protection
hooks rather than Opacus' own Lightning helper (which subclasses ``pytorch_lightning``).

``protect=[dp]`` acts at three places: the model (BatchNorm replaced, in-place activations turned
off, per-sample gradient hooks attached), the optimiser (per-sample clipping to ``max_grad_norm``
and Gaussian noise, :class:`~opacus.optimizers.DPOptimizer`) and the training loader (Poisson
sampling at rate ``data.batch_size / N``). The noise is calibrated so that the planned
``trainer.max_epochs`` spend ``(epsilon, delta)``; an accountant (RDP or PRV) follows every step,
``train/epsilon`` is logged each epoch and training stops before a step would exceed the budget.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import get_class
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch.utils.data import DataLoader

from medsec.core.contracts import Protection
from medsec.errors import ConfigError
from medsec.models.norms import batch_norm_modules, make_dp_compatible

log = logging.getLogger("medsec.dp")
ACCOUNTANTS = ("rdp", "prv")


class DifferentialPrivacy(Protection):
    """DP-SGD with a target ``(epsilon, delta)``.

    Args:
        epsilon: the privacy budget; the noise is calibrated to spend it over the planned epochs.
        delta: ``None`` = 1 / (training examples).
        max_grad_norm: per-sample gradient clipping norm C.
        noise_multiplier: a fixed sigma instead of calibrating one; training then stops when the
            next step would pass ``epsilon`` (``epsilon: null`` trains the planned epochs and
            reports what they spent).
        accountant: ``rdp`` (Renyi DP, Mironov 2017) or ``prv`` (privacy random variables,
            Gopi et al. 2021; tighter, slower).
        poisson_sampling: sample each example with probability ``q`` per step (what the
            accountants assume); ``false`` keeps shuffled fixed-size batches (common, not covered).
        secure_mode: cryptographically secure noise (Opacus' ``secure_mode``; slower).
        fix_model: replace BatchNorm by GroupNorm (recorded as ``model.batch_norm=group``, so the
            checkpoint rebuilds the same network); ``false`` refuses models with BatchNorm.
        planned_epochs: the epochs the budget covers; ``None`` = ``trainer.max_epochs``. A federation
            sets rounds x local epochs: each round's training continues the same accountant.
    """

    name = "dp"
    order = 60
    conflicts = ("adversarial_training",)  # its attack's input gradients would pass through the per-sample hooks

    def __init__(self, epsilon: float | None = 8.0, delta: float | None = None, max_grad_norm: float = 1.0,
                 noise_multiplier: float | None = None, accountant: str = "rdp", poisson_sampling: bool = True,
                 secure_mode: bool = False, fix_model: bool = True, planned_epochs: int | None = None) -> None:
        if epsilon is None and noise_multiplier is None:
            raise ConfigError("protect.dp: set epsilon (a budget) or noise_multiplier (a fixed sigma)")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"protect.dp.epsilon must be a positive number, got {epsilon}")
        if delta is not None and not 0 < delta < 1:
            raise ConfigError(f"protect.dp.delta must be in (0, 1), got {delta}")
        if not max_grad_norm > 0:
            raise ConfigError(f"protect.dp.max_grad_norm must be positive, got {max_grad_norm}")
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise ConfigError(f"protect.dp.noise_multiplier must be >= 0, got {noise_multiplier}")
        if planned_epochs is not None and not (isinstance(planned_epochs, int) and planned_epochs >= 1):
            raise ConfigError(f"protect.dp.planned_epochs must be a positive integer, got {planned_epochs!r}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"protect.dp.accountant must be one of {list(ACCOUNTANTS)}, got '{accountant}'")
        self.epsilon, self.target_delta, self.max_grad_norm = epsilon, delta, float(max_grad_norm)
        self.fixed_noise, self.accountant_name = noise_multiplier, accountant
        self.poisson_sampling, self.secure_mode, self.fix_model = poisson_sampling, secure_mode, fix_model
        self.planned_epochs = planned_epochs
        self.accountant: IAccountant = create_accountant(accountant)
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.delta: float | None = None
        self.steps_per_epoch = 0
        self._hooks: GradSampleModule | None = None

    # ---- the model -------------------------------------------------------------------------
    def check(self, task_info: Mapping[str, Any], task_target: str) -> None:
        task_class = get_class(task_target)
        if not getattr(task_class, "has_sample_loss", lambda: False)():
            raise ConfigError(f"protect=[dp]: {task_class.__name__} has no per-sample loss, which DP-SGD's "
                              "per-sample clipping needs (classification and segmentation have one)")

    def configure_model(self, task: L.LightningModule) -> None:
        if not self.fix_model and batch_norm_modules(task.net):
            raise ConfigError(f"protect=[dp]: BatchNorm layers {batch_norm_modules(task.net)[:5]} mix the samples "
                              "of a batch; set protect.dp.fix_model=true or model.batch_norm=group")
        if batch_norm_modules(task.net):
            task.hparams.model["batch_norm"] = "group"  # the checkpoint rebuilds the same network
        task.net = make_dp_compatible(task.net)
        task.per_sample_training = True
        # the hooks live here, not on the task: its state dict (the checkpoint) keeps the bare network's keys
        self._hooks = GradSampleModule(task.net, batch_first=True, loss_reduction="mean")

    # ---- the optimiser ---------------------------------------------------------------------
    def wrap_optimizers(self, optimizers: Any, task: L.LightningModule) -> Any:
        config = optimizers if isinstance(optimizers, dict) else {"optimizer": optimizers}
        if not isinstance(config.get("optimizer"), torch.optim.Optimizer):
            raise ConfigError("protect=[dp] needs one optimiser from configure_optimizers (not a list)")
        trainer = task.trainer
        self._plan(len(trainer.datamodule.datasets["train"]), trainer.datamodule.batch_size, trainer)
        world = trainer.world_size
        optimizer_class = DistributedDPOptimizer if world > 1 else DPOptimizer
        optimizer = optimizer_class(config["optimizer"], noise_multiplier=self.noise_multiplier,
                                    max_grad_norm=self.max_grad_norm,
                                    expected_batch_size=max(trainer.datamodule.batch_size // world, 1),
                                    loss_reduction="mean", secure_mode=self.secure_mode)
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        scheduler = config.get("lr_scheduler")
        if scheduler is not None:
            scheduler = scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler
            scheduler.optimizer = optimizer  # the wrapper shares the original's parameter groups
        return {**config, "optimizer": optimizer}

    def _plan(self, examples: int, batch_size: int, trainer: L.Trainer) -> None:
        """Sample rate, steps and the noise that spends the budget over the planned epochs."""
        if batch_size > examples:
            raise ConfigError(f"protect=[dp]: data.batch_size={batch_size} exceeds the {examples} training examples")
        epochs = self.planned_epochs or trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ConfigError("protect=[dp] calibrates its noise over trainer.max_epochs, which must be set")
        self.sample_rate = batch_size / examples
        self.delta = self.target_delta if self.target_delta is not None else 1 / examples
        self.steps_per_epoch = _limited(int(1 / self.sample_rate), trainer.limit_train_batches)
        planned = epochs * self.steps_per_epoch
        if self.fixed_noise is not None:
            self.noise_multiplier = float(self.fixed_noise)
        else:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.epsilon, target_delta=self.delta, sample_rate=self.sample_rate, steps=planned,
                accountant=self.accountant_name, epsilon_tolerance=0.01)
        log.info("DP-SGD: sigma %.3f, C %.2f, q %.4g over %d steps (%d epochs), delta %.2g, %s accountant",
                 self.noise_multiplier, self.max_grad_norm, self.sample_rate, planned, epochs, self.delta,
                 self.accountant_name)

    # ---- the loader, the trainer, the budget -----------------------------------------------
    def wrap_train_loader(self, loader: DataLoader) -> DataLoader:
        if not self.poisson_sampling or self.sample_rate is None:
            return loader
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return DPDataLoader(loader.dataset, sample_rate=self.sample_rate, collate_fn=loader.collate_fn,
                            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                            persistent_workers=loader.persistent_workers, distributed=distributed)

    def trainer_options(self) -> dict[str, Any]:
        # Lightning cannot put a distributed sampler into Poisson sampling; the DP loader shards itself
        return {"use_distributed_sampler": False}

    def spent(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far, plus ``extra_steps`` more steps at the same sigma and rate."""
        accountant = self.accountant
        if extra_steps:
            accountant = copy.deepcopy(accountant)
            accountant.history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not accountant.history or self.noise_multiplier == 0:
            return 0.0 if not accountant.history else math.inf
        return float(accountant.get_epsilon(delta=self.delta))

    def callbacks(self) -> list[L.Callback]:
        return [PrivacyBudget(self)]


def _limited(steps: int, limit: float | None) -> int:
    """Steps per epoch under ``trainer.limit_train_batches``."""
    if limit is None:
        return steps
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 1:
        return min(steps, limit)
    return max(1, int(steps * float(limit)))


class PrivacyBudget(L.Callback):
    """Logs ``train/epsilon`` every epoch and the DP settings (``dp/...``, in ``metrics.json``);
    stops training before a step would spend more than the budget."""

    def __init__(self, dp: DifferentialPrivacy) -> None:
        self.dp = dp
        self._check_each_step = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = self.dp.epsilon
        self._check_each_step = budget is not None and self.dp.spent(self.dp.steps_per_epoch) > budget

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._check_each_step:
            return
        projected = self.dp.spent(1)
        if projected > self.dp.epsilon:
            log.warning("privacy budget: one more step would spend epsilon %.3f > %.3f; training stops after "
                        "%d steps (epsilon %.3f)", projected, self.dp.epsilon, trainer.global_step,
                        self.dp.spent())
            trainer.fit_loop.min_epochs = trainer.fit_loop.epoch_loop.min_steps = 0  # the budget outranks min_epochs
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dp, spent = self.dp, self.dp.spent()
        pl_module.log("train/epsilon", spent, prog_bar=True)
        pl_module.log_dict({"dp/epsilon": spent, "dp/delta": dp.delta, "dp/noise_multiplier": dp.noise_multiplier,
                            "dp/max_grad_norm": dp.max_grad_norm, "dp/sample_rate": dp.sample_rate,
                            "dp/steps": float(sum(steps for _, _, steps in dp.accountant.history))})
