"""Run-directory I/O: metrics, the resolved config, loggers and their files."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from medsec.errors import ConfigError
from medsec.utils.outputs import OutputWriter

log = logging.getLogger("medsec")


def to_float(value: Any) -> float | None:
    """A metric value as a JSON-safe float (NaN/inf become ``None``)."""
    number = float(value.item() if hasattr(value, "item") else value)
    return number if math.isfinite(number) else None


def collect_metrics(*metric_maps: Mapping[str, Any]) -> dict[str, float | None]:
    """Merge Lightning metric dicts, keeping the ``stage/name`` keys and dropping step-level ones."""
    merged: dict[str, float | None] = {}
    for metrics in metric_maps:
        for key, value in metrics.items():
            if "/" in key and not key.endswith("_step"):
                merged[key.removesuffix("_epoch")] = to_float(value)
    return dict(sorted(merged.items()))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config with every interpolation resolved, without Hydra's own node."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True)


@rank_zero_only
def save_resolved_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the resolved config (without Hydra's own node) as ``config.yaml``."""
    path = Path(out_dir) / "config.yaml"
    path.write_text(OmegaConf.to_yaml(resolved_config(cfg)))
    return path


def instantiate_list(cfg: DictConfig | None, **kwargs: Any) -> list[Any]:
    """Instantiate every entry of a config group mapping (callbacks, loggers) that has a ``_target_``."""
    if not cfg:
        return []
    return [instantiate(entry, **kwargs) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def check_sealed_loggers(stage: Any, loggers: list[Any]) -> None:
    """With ``crypto.encrypt_outputs=true``, refuse loggers whose files or servers would hold the
    run's test metrics in clear (the CSV logger's files are sealed when the run ends)."""
    from lightning.pytorch.loggers import CSVLogger

    if not getattr(stage, "encrypt_outputs", False):
        return
    unsealable = sorted({type(lg).__name__ for lg in loggers if not isinstance(lg, CSVLogger)})
    if unsealable:
        raise ConfigError(f"logger: {', '.join(unsealable)} would keep per-run metrics in clear, which "
                          "crypto.encrypt_outputs=true forbids; use logger=csv (sealed at the end) or logger=none")


def seal_logger_files(trainer: Any, writer: OutputWriter, out_dir: Path) -> None:
    """Replace the CSV logger's files under ``out_dir`` by sealed copies (``crypto.encrypt_outputs``)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or not Path(logger.log_dir).is_dir():
            continue
        logger.finalize("success")
        for path in sorted(Path(logger.log_dir).rglob("*")):
            if path.is_file() and not path.name.endswith(writer.suffix):
                writer.write(path.relative_to(out_dir).as_posix(), path.read_bytes())
                path.unlink()


def publish_results(out_dir: str | Path, metrics: Mapping[str, float | None], task: Any,
                    writer: OutputWriter | None = None, trainer: Any = None) -> None:
    """Write ``metrics.json`` and let the task save its test outputs (plots, per-case predictions)
    through ``writer`` (plain files by default; a security stage's writer seals them, and then the
    CSV logger's files of ``trainer`` are sealed too)."""
    out_dir = Path(out_dir)
    writer = writer or OutputWriter(out_dir)
    writer.write_json("metrics.json", metrics)
    save = getattr(task, "save_test_outputs", None)
    if save is not None:
        save(out_dir, writer)
    if writer.sealed and trainer is not None:
        seal_logger_files(trainer, writer, out_dir)
    log.info("results in %s", out_dir)
