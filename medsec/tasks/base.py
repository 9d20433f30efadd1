"""The base every task stands on: model/loss/metric hooks, optimisers, fine-tuning, and the task
contract: the metric a task is judged by (:attr:`BaseTask.monitor`, :attr:`BaseTask.mode`), its
best-so-far value, what an attack on it ascends (:meth:`BaseTask.attack_objective`) and its test
outputs (:meth:`BaseTask.save_test_outputs`, through an :class:`~medsec.utils.outputs.OutputWriter`)."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.aggregation import MaxMetric, MinMetric

from medsec.core.checkpoint import read_checkpoint
from medsec.core.registry import safe_instantiate
from medsec.errors import ConfigError
from medsec.models.norms import BATCH_NORM_CHOICES, group_norm

if TYPE_CHECKING:
    from medsec.tasks.objective import AttackObjective
    from medsec.utils.outputs import OutputWriter

log = logging.getLogger(__name__)

MODES = ("max", "min")


class BaseTask(L.LightningModule, ABC):
    """Owns ``self.net`` plus losses and metrics, built by the three ``configure_*`` hooks.

    ``model`` is the Hydra ``model`` config (``net`` with ``_target_`` and arguments, plus
    ``pretrained``, ``init_from`` and ``freeze_backbone``); ``optimizer`` and ``scheduler`` are
    ``_partial_`` configs. All are stored as hyper-parameters, so ``load_from_checkpoint`` rebuilds
    the task without any config file.

    The contract every concrete task fulfils:

    * :attr:`monitor` and :attr:`mode`: the validation metric it is judged by (class attributes, or
      properties when they depend on hyper-parameters). The runner picks the best checkpoint and
      stops early on it; the task logs its best-so-far value as ``<monitor>_best`` every
      validation epoch (and ``<name>_best`` for every metric of :attr:`also_tracked`).
    * :meth:`validation_epoch_metrics`: the epoch's validation metrics (logged here, before the
      best-so-far values); metrics logged per step with ``on_epoch=True`` count too.
    * :meth:`attack_objective`: how adversarial attacks attack and score it, or a ``ConfigError``
      saying it cannot be attacked.
    * :meth:`save_test_outputs`: its test artifacts, written only through the writer it is given.
    * :meth:`sample_loss`: the loss of each sample on its own, for tasks that can train with
      differential privacy (per-sample clipping needs losses that do not mix samples) and be
      audited for membership; :meth:`training_loss` is what a training step minimises.
    """

    net: nn.Module
    monitor: str
    """The validation metric the task is judged by (``val/...``)."""
    mode: str = "max"
    """``max`` or ``min``: which way :attr:`monitor` improves."""
    also_tracked: ClassVar[Mapping[str, str]] = {}
    """Further validation metrics whose best-so-far value is logged (name -> ``max``/``min``)."""
    per_sample_training: bool = False
    """Train on the mean of :meth:`sample_loss` (set by protections that clip per-sample gradients)."""

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()  # includes the subclass's arguments
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        self.best_metrics = nn.ModuleDict({name: self._running_best(name, mode) for name, mode in self.tracked.items()})

    # ---- the metric the task is judged by ------------------------------------------------
    @property
    def tracked(self) -> dict[str, str]:
        """Every metric tracked best-so-far (name -> mode): :attr:`monitor` first."""
        monitor = getattr(self, "monitor", None)
        if not isinstance(monitor, str) or not monitor.startswith("val/"):
            raise TypeError(f"{type(self).__name__} must declare `monitor`, the validation metric it is judged "
                            f"by ('val/...'), got {monitor!r}")
        return {monitor: self.mode, **self.also_tracked}

    @staticmethod
    def _running_best(name: str, mode: str) -> MaxMetric | MinMetric:
        if mode not in MODES:
            raise TypeError(f"the mode of {name} must be one of {list(MODES)}, got {mode!r}")
        return MaxMetric(nan_strategy="ignore") if mode == "max" else MinMetric(nan_strategy="ignore")

    def validation_epoch_metrics(self) -> Mapping[str, Any]:
        """The validation metrics of the epoch that ends (computed, and their states reset), by
        full name (``val/...``); nothing by default (tasks that log per step)."""
        return {}

    def on_fit_start(self) -> None:
        for best in self.best_metrics.values():
            best.reset()

    def on_validation_epoch_end(self) -> None:
        """Log :meth:`validation_epoch_metrics`, then (outside the sanity check) the best-so-far
        value of every tracked metric as ``<name>_best``. NaN values (an undefined metric) never
        become the best; before any defined value the best is ``-inf`` (``inf`` for ``min``)."""
        values = dict(self.validation_epoch_metrics())
        if values:
            self.log_dict(values)
        if self.trainer.sanity_checking:
            return
        logged = self.trainer.callback_metrics  # includes this epoch's per-step metrics, reduced
        for name, best in self.best_metrics.items():
            if name not in logged:
                raise RuntimeError(f"{type(self).__name__} tracks {name} but has not logged it at validation; "
                                   f"logged: {sorted(logged)}")
            best.update(logged[name].detach().float())
            self.log(f"{name}_best", float(best.compute()))  # the same on every rank: no sync needed

    # ---- extension points ----------------------------------------------------------------
    def attack_objective(self) -> AttackObjective:
        """What adversarial attacks ascend and how they are scored
        (:mod:`medsec.tasks.objective`); a ``ConfigError`` naming the task if it cannot be attacked."""
        raise ConfigError(f"{type(self).__name__} cannot be attacked: it declares no attack objective")

    def sample_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of every sample of a batch, shape ``(N,)``, each depending on that sample
        alone; a ``ConfigError`` naming the task if it has none."""
        raise ConfigError(f"{type(self).__name__} declares no per-sample loss (it cannot train with "
                          "differential privacy or be audited for membership)")

    @classmethod
    def has_sample_loss(cls) -> bool:
        return cls.sample_loss is not BaseTask.sample_loss

    def training_loss(self, outputs: torch.Tensor, target: torch.Tensor, loss: Callable[..., torch.Tensor]) -> torch.Tensor:
        """What a training step minimises: ``loss(outputs, target)``, or the mean of
        :meth:`sample_loss` under :attr:`per_sample_training` (no sample's loss depends on another,
        unlike a class-weighted or masked batch mean)."""
        if self.per_sample_training:
            losses = self.sample_loss(outputs, target)
            return losses.sum() / max(len(losses), 1)  # Poisson sampling may draw an empty batch
        return loss(outputs, target)

    def save_test_outputs(self, out_dir: str | Path, writer: OutputWriter) -> None:
        """Write what the last test produced (plots, per-case predictions) through ``writer``, never
        to disk directly (a sealing writer encrypts them); nothing by default."""

    @abstractmethod
    def configure_models(self) -> None:
        """Build ``self.net`` from ``self.hparams.model``."""

    @abstractmethod
    def configure_losses(self) -> None:
        """Build the loss function(s)."""

    @abstractmethod
    def configure_metrics(self) -> None:
        """Build torchmetrics objects, one set per stage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def build_net(self, **data_args: Any) -> nn.Module:
        """Instantiate ``model.net`` with the arguments the data decide (classes, channels, dims);
        ``model.batch_norm=group`` replaces its BatchNorm layers by GroupNorm."""
        if "net" not in self.hparams.model:
            raise ConfigError("model.net is missing: the model config must say which network to build")
        net = safe_instantiate(self.hparams.model["net"], "model.net", ("network",), **data_args)
        batch_norm = self.hparams.model.get("batch_norm", "keep")
        if batch_norm not in BATCH_NORM_CHOICES:
            raise ConfigError(f"model.batch_norm must be one of {list(BATCH_NORM_CHOICES)}, got '{batch_norm}'")
        return group_norm(net) if batch_norm == "group" else net

    @staticmethod
    def gather_rows(rows: list[Any], key: Callable[[Any], Hashable]) -> list[Any]:
        """Rows collected on every DDP rank, in one list without the repeats DDP's sampler pads
        with (``key`` identifies a row); the rows themselves outside DDP."""
        if not (dist.is_available() and dist.is_initialized()):
            return rows
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return list({key(row): row for part in gathered for row in part}.values())

    def initialize_weights(self) -> None:
        """Load ``model.pretrained`` / ``model.init_from`` and apply ``model.freeze_backbone``.

        Called by ``medsec train`` before fitting, never by ``load_from_checkpoint``, so a
        checkpoint does not depend on the files it was initialised from.
        """
        cfg = self.hparams.model
        if cfg.get("pretrained"):
            from medsec.models.classifiers import load_backbone_weights

            skipped = load_backbone_weights(self.net, cfg["pretrained"])
            log.info("loaded pretrained backbone from %s (skipped %d keys)", cfg["pretrained"], len(skipped))
        if cfg.get("init_from"):
            self.load_weights_from(cfg["init_from"])
        if cfg.get("freeze_backbone"):
            backbone = getattr(self.net, "backbone", None)
            if backbone is None:
                raise ConfigError("model.freeze_backbone: this network has no separate backbone")
            backbone.requires_grad_(False)
            log.info("backbone frozen: only the head is trained")

    def load_weights_from(self, path: str | Path) -> list[str]:
        """Copy matching weights from a checkpoint (or state dict); layers whose shape differs
        (a new class set's head) keep their fresh initialisation. Returns the replaced keys."""
        path = Path(path).expanduser()
        state = read_checkpoint(path, field="model.init_from", run_info=False)
        state = state.get("state_dict", state)
        own = self.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        replaced = sorted(k for k in own if k not in fitting)
        if not fitting:
            raise ConfigError(f"model.init_from: no weights in {path} fit this model")
        self.load_state_dict(fitting, strict=False)
        log.info("initialised from %s; freshly initialised: %s", path, ", ".join(replaced) or "nothing")
        return replaced

    def on_train_epoch_start(self) -> None:
        if self.hparams.model.get("freeze_backbone"):
            self.net.backbone.eval()  # keep frozen batch-norm statistics

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = safe_instantiate(self.hparams.optimizer, "task.optimizer", ("optimizer",))(params=params)
        if not self.hparams.get("scheduler"):
            return {"optimizer": optimizer}
        scheduler = safe_instantiate(self.hparams.scheduler, "task.scheduler", ("scheduler",))(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
