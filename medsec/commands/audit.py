"""`medsec audit ckpt_path=...`: membership inference against a trained model; writes ``audit.json``,
``audit.md`` and ``plots/audit_roc.png``.

Members are training images of the checkpoint, read through the evaluation transforms (never
augmented); non-members as many test images. The loss attack thresholds each image's loss; LiRA
compares the model's confidence on an image with that of shadow models trained with and without it.
Each attack's success proves a lower bound on the training's DP epsilon; a claimed epsilon
(``audit.epsilon``, else ``dp/epsilon`` in the training run's ``metrics.json``) bounds the TPR.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader

from medsec.analysis.privacy.membership import (
    dp_tpr_bound,
    empirical_epsilon,
    lira_scores,
    loss_threshold_scores,
    roc,
    tpr_at_fpr,
)
from medsec.analysis.privacy.report import markdown_table
from medsec.analysis.privacy.shadows import sample_statistics, train_shadows
from medsec.core.app import hydra_app
from medsec.core.checkpoint import read_checkpoint
from medsec.core.run import Run
from medsec.data.sources.base import Record
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.utils.run import to_float
from medsec.viz.plots import png_bytes
from medsec.viz.privacy import plot_audit_roc

log = logging.getLogger("medsec.audit")
ATTACKS = ("loss", "lira")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_count(field: str, value: Any, minimum: int) -> None:
    if not _is_number(value) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"audit.{field} must be an integer of at least {minimum}, got {value!r}")


def _check_rate(field: str, value: Any, zero_allowed: bool = False) -> None:
    if not _is_number(value) or not (0 <= value < 1 if zero_allowed else 0 < value < 1):
        raise ConfigError(f"audit.{field} must be in {'[0' if zero_allowed else '(0'}, 1), got {value!r}")


def check_settings(settings: DictConfig) -> None:
    """Refuse bad ``audit.*`` settings before any work, naming the field."""
    for field in ("attacks", "fpr"):
        if not isinstance(settings[field], ListConfig) or not settings[field]:
            raise ConfigError(f"audit.{field} must be a non-empty list, got {settings[field]!r}")
    attacks = list(settings.attacks)
    unknown = [name for name in attacks if name not in ATTACKS]
    if unknown:
        raise ConfigError(f"audit.attacks: unknown attack {unknown}; choose from {list(ATTACKS)}")
    for field, minimum in (("shadows", 0), ("members", 1), ("batch_size", 1)):
        _check_count(field, settings[field], minimum)
    if settings.shadow_epochs is not None:
        _check_count("shadow_epochs", settings.shadow_epochs, 1)
    if "lira" in attacks and settings.shadows == 1:
        raise ConfigError("audit.shadows: lira needs at least 2 shadow models (0 runs the loss attack only), got 1")
    for value in settings.fpr:
        _check_rate("fpr", value)
    _check_rate("confidence", settings.confidence)
    if settings.delta is not None:
        _check_rate("delta", settings.delta, zero_allowed=True)
    if settings.epsilon is not None and not (_is_number(settings.epsilon) and settings.epsilon >= 0):
        raise ConfigError(f"audit.epsilon must be a number of at least 0 (or null), got {settings.epsilon!r}")


def matched_choice(members: list[Record], non_members: list[Record], count: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of at most ``count`` members and as many non-members with the same number of each
    class (multi-class records): the two pools then differ only in membership, not in class mix,
    which a loss attack would otherwise pick up (e.g. PneumoniaMNIST's train and test splits hold
    different shares of pneumonia). Other targets: a plain random choice of ``count`` of each."""
    rng = np.random.default_rng(seed)
    labels = [np.array([r.get("label") for r in records], dtype=object) for records in (members, non_members)]
    if not all(isinstance(label, (int, np.integer)) for pool in labels for label in pool):
        count = min(count, len(members), len(non_members))
        return (np.sort(rng.choice(len(members), count, replace=False)),
                np.sort(rng.choice(len(non_members), count, replace=False)))
    classes = sorted(set(labels[0]) & set(labels[1]))
    available = np.array([min((labels[0] == c).sum(), (labels[1] == c).sum()) for c in classes])
    share = np.floor(available * min(1.0, count / max(available.sum(), 1))).astype(int)
    chosen: tuple[list[int], list[int]] = ([], [])
    for cls, n in zip(classes, share):
        for pool, out in zip(labels, chosen):
            out.extend(rng.choice(np.flatnonzero(pool == cls), n, replace=False).tolist())
    return np.sort(chosen[0]), np.sort(chosen[1])


def audit_pool(run: Run, records: list[Record], chosen: np.ndarray, split: str,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``chosen`` records through the evaluation transforms (for training records: as the model
    saw them, minus the augmentation), with their targets."""
    dataset = run.datamodule.dataset([records[i] for i in chosen], train=False)
    batches = list(DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0))
    if len({tuple(batch["image"].shape[1:]) for batch in batches}) > 1:
        raise ConfigError(f"audit: the {split} images differ in size; a membership audit needs images of one size")
    return (torch.cat([batch["image"] for batch in batches]),
            torch.cat([batch.get("label", batch.get("mask")) for batch in batches]))


def trained_epochs(cfg: DictConfig, run: Run) -> int:
    """The epochs behind the checkpoint's weights (Lightning stores the epoch it saved in, from 0)."""
    return int(read_checkpoint(cfg.ckpt_path, run.protections.sealer).get("epoch", 0)) + 1


def claimed_epsilon(settings: DictConfig, ckpt_path: str) -> tuple[float | None, float | None, str | None]:
    """(epsilon, delta, where from): ``audit.epsilon``, else the ``dp/epsilon`` and ``dp/delta`` a DP
    training run wrote to its ``metrics.json`` (beside ``checkpoints/``); nothing when neither says."""
    if settings.epsilon is not None:
        return float(settings.epsilon), None, "audit.epsilon"
    path = Path(ckpt_path).expanduser().parent.parent / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None, None
    epsilon, delta = (metrics.get(key) if isinstance(metrics, dict) else None for key in ("dp/epsilon", "dp/delta"))
    if not _is_number(epsilon) or epsilon < 0:
        return None, None, None
    return float(epsilon), float(delta) if _is_number(delta) and 0 <= delta < 1 else None, str(path)


def summarise(scores: np.ndarray, is_member: np.ndarray, settings: DictConfig, delta: float,
              epsilon: float | None) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, float]]:
    """One attack's entry in ``audit.json``, and its ROC curve (FPR, TPR, AUC)."""
    fpr, tpr, auc = roc(scores, is_member)
    bound = empirical_epsilon(scores, is_member, delta, settings.confidence)
    entry: dict[str, Any] = {
        "auc": auc, "tpr_at_fpr": {f"{f:g}": tpr_at_fpr(fpr, tpr, f) for f in settings.fpr},
        "epsilon": asdict(bound) | {"point": to_float(bound.point)}}
    if epsilon is not None:
        entry["dp_tpr_bound"] = {f"{f:g}": float(dp_tpr_bound(f, epsilon, delta)) for f in settings.fpr}
        entry["within_dp_bound"] = bound.lower <= epsilon
    return entry, (fpr, tpr, auc)


def attack_scores(cfg: DictConfig, run: Run, images: torch.Tensor, targets: torch.Tensor, losses: np.ndarray,
                  stats: np.ndarray) -> tuple[dict[str, np.ndarray], int | None]:
    """Each configured attack's membership scores (LiRA trains its shadow models first), and the
    epochs each shadow model trained for (``None`` without shadows)."""
    settings = cfg.audit
    scores: dict[str, np.ndarray] = {}
    shadow_epochs = None
    for name in dict.fromkeys(settings.attacks):
        if name == "loss":
            scores[name] = loss_threshold_scores(losses)
        elif settings.shadows == 0:
            log.info("lira skipped: audit.shadows=0")
        else:
            shadow_epochs = settings.shadow_epochs or trained_epochs(cfg, run)
            log.info("training %d shadow models for %d epochs on halves of %d images", settings.shadows,
                     shadow_epochs, len(images))
            shadow_stats, in_shadow = train_shadows(run.task, images, targets, settings.shadows, shadow_epochs,
                                                    run.datamodule.batch_size, cfg.seed)
            scores[name] = lira_scores(stats, shadow_stats, in_shadow, settings.online)
    return scores, shadow_epochs


def audit(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured membership attacks; returns the report written to ``audit.json``."""
    settings = cfg.audit
    check_settings(settings)
    run = Run.open(cfg)
    task = run.task
    if not (isinstance(task, BaseTask) and task.has_sample_loss()):
        raise ConfigError(f"ckpt_path: {type(task).__name__} declares no per-sample loss; a membership audit "
                          "needs the loss of every image on its own (classification and segmentation tasks have one)")
    train_records, test_records = (run.datamodule.records(split) for split in ("train", "test"))
    trained = len(train_records)
    member_ids, non_member_ids = matched_choice(train_records, test_records, settings.members, cfg.seed)
    count = len(member_ids)
    if count < settings.members:
        log.info("auditing %d members and %d non-members (class-matched; audit.members=%d is more than the "
                 "splits allow)", count, count, settings.members)
    members = audit_pool(run, train_records, member_ids, "train", settings.batch_size)
    non_members = audit_pool(run, test_records, non_member_ids, "test", settings.batch_size)
    images, targets = (torch.cat(pair) for pair in zip(members, non_members))
    is_member = np.arange(2 * count) < count
    losses, stats = sample_statistics(task, images, targets, settings.batch_size)
    scores, shadow_epochs = attack_scores(cfg, run, images, targets, losses, stats)
    shadows = settings.shadows if "lira" in scores else 0
    epsilon, claimed_delta, source = claimed_epsilon(settings, cfg.ckpt_path)
    delta = next(d for d in (settings.delta, claimed_delta, 1 / trained) if d is not None)
    results, curves = {}, {}
    for name, values in scores.items():
        results[name], curves[name] = summarise(values, is_member, settings, delta, epsilon)
        results[name]["shadows"] = shadows if name == "lira" else 0
        tprs = ", ".join(f"{v:.3f} @ {k}" for k, v in results[name]["tpr_at_fpr"].items())
        log.info("%s: AUC %.3f, TPR %s FPR, epsilon >= %.3f (%g%% confidence)", name, curves[name][2], tprs,
                 results[name]["epsilon"]["lower"], 100 * settings.confidence)
    report = {"checkpoint": str(cfg.ckpt_path), "members": count, "non_members": count,
              "training_examples": trained, "shadows": shadows, "shadow_epochs": shadow_epochs,
              "online": bool(settings.online), "fpr": list(settings.fpr), "delta": delta,
              "confidence": settings.confidence,
              "claimed": None if epsilon is None else {"epsilon": epsilon, "source": source},
              "attacks": results}
    writer = run.writer  # sealing with encrypt_outputs
    writer.write_json("audit.json", report)
    writer.write("audit.md", markdown_table(report).encode())
    lowest = 1e-4 if count >= 10_000 else 1e-3
    writer.write("plots/audit_roc.png", png_bytes(plot_audit_roc(curves, lowest, epsilon, delta)))
    log.info("results in %s", run.out_dir)
    return report


main = hydra_app("audit", audit)

if __name__ == "__main__":
    main()
