"""CheXNet-style classification: multi-class (cross-entropy) and multi-label (masked BCE)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassROC,
    MulticlassStatScores,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelROC,
    MultilabelStatScores,
)

from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.tasks.multilabel import UNKNOWN, defined_classes, macro_auroc, masked_bce, masked_bce_per_sample
from medsec.tasks.objective import AttackObjective, multiclass_objective, multilabel_objective
from medsec.utils.outputs import OutputWriter


class ClassificationTask(BaseTask):
    """Classify images into ``class_names`` (one class each, or any subset when ``multilabel``).

    Logs ``{train,val,test}/loss``, ``/acc``, ``/f1``, ``/auroc`` (macro over classes that have
    both positives and negatives in the split), ``val/auroc_best``, ``val/acc_best`` and, on test,
    ``test/auroc_<class>`` per class. After ``trainer.test``, ``test_curves`` holds ROC curves and
    the confusion matrix and ``test_predictions`` one row per test image (id, target, probabilities);
    :meth:`save_test_outputs` writes them as plots and ``predictions.csv``.

    Args:
        model: the ``model`` config (``net`` plus fine-tuning options).
        num_classes, class_names, multilabel, in_channels, spatial_dims: from the data module.
        optimizer, scheduler: ``_partial_`` configs.
        class_weights: ``None``, ``"balanced"`` (inverse train frequency, multi-class only) or a list.
        class_counts: training examples per class (for ``"balanced"``).

    Judged by ``val/auroc`` (max). Attacked through its logits: cross-entropy and accuracy
    (multi-class), masked BCE and macro AUROC (multi-label).
    """

    monitor = "val/auroc"
    mode = "max"
    also_tracked: ClassVar[Mapping[str, str]] = {"val/acc": "max"}

    def __init__(
        self,
        model: Mapping[str, Any],
        num_classes: int,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        multilabel: bool = False,
        in_channels: int = 1,
        spatial_dims: int = 2,
        class_weights: str | Sequence[float] | None = None,
        class_counts: Sequence[int] | None = None,
    ) -> None:
        if num_classes < (1 if multilabel else 2):
            raise ConfigError(f"classification needs at least 2 classes (or 1 finding), got {num_classes}")
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {num_classes} classes")
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler)
        self.test_curves: dict[str, Any] = {}
        self.test_predictions: list[tuple[str, list[float], list[float]]] = []

    def configure_models(self) -> None:
        hp = self.hparams
        self.net = self.build_net(num_classes=hp.num_classes, in_channels=hp.in_channels, spatial_dims=hp.spatial_dims)

    def configure_losses(self) -> None:
        weights = self.hparams.class_weights
        if weights == "balanced":
            counts = self.hparams.class_counts
            if not counts or self.hparams.multilabel:
                raise ConfigError("task.class_weights=balanced needs multi-class data with class counts")
            counts_t = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
            weights = counts_t.sum() / (len(counts_t) * counts_t)
        elif weights is not None:
            weights = torch.as_tensor(list(weights), dtype=torch.float32)
            if len(weights) != self.hparams.num_classes:
                raise ConfigError(f"task.class_weights has {len(weights)} entries for {self.hparams.num_classes} classes")
        self.register_buffer("class_weight", weights if weights is not None else None)

    def configure_metrics(self) -> None:
        n, ml = self.hparams.num_classes, self.hparams.multilabel
        if ml:
            def summary() -> MetricCollection:
                return MetricCollection({
                    "acc": MultilabelAccuracy(n, ignore_index=UNKNOWN),
                    "f1": MultilabelF1Score(n, ignore_index=UNKNOWN),
                    "auroc_per_class": MultilabelAUROC(n, average=None, ignore_index=UNKNOWN),
                    "support": MultilabelStatScores(n, average=None, ignore_index=UNKNOWN),
                })
            self.test_roc = MultilabelROC(n, ignore_index=UNKNOWN)
            self.test_confmat = MultilabelConfusionMatrix(n, ignore_index=UNKNOWN)
        else:
            def summary() -> MetricCollection:
                return MetricCollection({
                    "acc": MulticlassAccuracy(n, average="micro"),
                    "f1": MulticlassF1Score(n, average="macro"),
                    "auroc_per_class": MulticlassAUROC(n, average=None),
                    "support": MulticlassStatScores(n, average=None),
                })
            self.test_roc = MulticlassROC(n)
            self.test_confmat = MulticlassConfusionMatrix(n)
        self.train_metrics, self.val_metrics, self.test_metrics = summary(), summary(), summary()

    def _metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    # ---- steps ----------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.hparams.multilabel:
            return F.cross_entropy(logits, target, weight=self.class_weight)
        return masked_bce(logits, target)

    def sample_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy (multi-class) or masked BCE (multi-label) of each sample."""
        if not self.hparams.multilabel:
            return F.cross_entropy(logits, target, weight=self.class_weight, reduction="none")
        return masked_bce_per_sample(logits, target)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.hparams.multilabel else torch.softmax(logits, dim=1)

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        target = batch["label"]
        loss = self.training_loss(logits, target, self.loss) if stage == "train" else self.loss(logits, target)
        probs = self.probabilities(logits.detach())
        metric_target = target.long() if self.hparams.multilabel else target
        self._metrics(stage).update(probs, metric_target)
        if stage == "test":
            self.test_roc.update(probs, metric_target)
            self.test_confmat.update(probs, metric_target)
            targets = target.reshape(len(target), -1).float().tolist()
            self.test_predictions += list(zip(batch["id"], targets, probs.float().tolist()))
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=len(target), sync_dist=stage != "train")
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.probabilities(self(batch["image"]))

    # ---- epoch ends ----------------------------------------------------------------------
    def _summarise(self, stage: str) -> dict[str, float]:
        raw = self._metrics(stage).compute()
        self._metrics(stage).reset()
        support = raw["support"]  # (classes, [tp, fp, tn, fn, support])
        positives = support[:, 0] + support[:, 3]
        negatives = support[:, 1] + support[:, 2]
        per_class = raw["auroc_per_class"]
        values = {"acc": float(raw["acc"]), "f1": float(raw["f1"]),
                  "auroc": macro_auroc(per_class, positives, negatives)}
        if stage == "test":
            for name, auc, ok in zip(self.class_names, per_class.tolist(), defined_classes(positives, negatives)):
                values[f"auroc_{name}"] = auc if ok else float("nan")
        return values

    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def on_train_epoch_end(self) -> None:
        values = self._summarise("train")
        self.log_dict({f"train/{k}": v for k, v in values.items() if k != "auroc"})

    def validation_epoch_metrics(self) -> dict[str, float]:
        return {f"val/{k}": v for k, v in self._summarise("val").items()}

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        values = self._summarise("test")
        self.log_dict({f"test/{k}": v for k, v in values.items()})
        fpr, tpr, _ = self.test_roc.compute()
        self.test_curves = {
            "class_names": self.class_names,
            "multilabel": self.hparams.multilabel,
            "roc": [(f.cpu().numpy(), t.cpu().numpy()) for f, t in zip(fpr, tpr)],
            "auroc": [values[f"auroc_{n}"] for n in self.class_names],
            "confusion": self.test_confmat.compute().cpu().numpy(),
        }
        self.test_roc.reset()
        self.test_confmat.reset()
        self.test_predictions = self.gather_rows(self.test_predictions, key=lambda row: row[0])

    def prediction_table(self) -> tuple[list[str], list[list[Any]]]:
        """``test_predictions`` as a table: header and rows of id, target(s), one probability per class."""
        targets = self.class_names if self.hparams.multilabel else ["label"]
        header = ["id", *(f"target_{t}" if self.hparams.multilabel else t for t in targets),
                  *(f"prob_{c}" for c in self.class_names)]
        rows = [[record_id, *(int(t) for t in target), *(f"{p:.6f}" for p in probs)]
                for record_id, target, probs in self.test_predictions]
        return header, rows

    def save_test_outputs(self, out_dir: str | Path, writer: OutputWriter) -> None:
        """ROC and confusion plots under ``plots/`` and the per-image ``predictions`` table, through
        ``writer`` (sealed when the run encrypts its outputs: on small test sets the ROC steps reveal cases)."""
        if self.test_curves:
            from medsec.viz import save_classification_plots

            save_classification_plots(self.test_curves, writer)
        if self.test_predictions:
            writer.write_table("predictions", *self.prediction_table())

    # ---- contract ------------------------------------------------------------------------
    def attack_objective(self) -> AttackObjective:
        build = multilabel_objective if self.hparams.multilabel else multiclass_objective
        return build(self, int(self.hparams.num_classes))
