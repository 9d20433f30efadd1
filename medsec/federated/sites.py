"""The configs a federation runs with: one per site (its data, its protections, a quiet trainer for
its local epochs) and the server's (the global validation and test data)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from medsec.core.run import Run

PARTITION_TARGET = "medsec.data.sources.partition.PartitionSource"
QUIET_TRAINER = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                 "num_sanity_val_steps": 0}
"""Site and server trainers: no checkpoint files, progress bars or summaries (the server writes the
round checkpoints itself)."""


def num_sites(cfg: DictConfig) -> int:
    """``len(federation.sites)`` when the sites are listed, else ``federation.num_sites``."""
    sites = cfg.federation.get("sites")
    return len(sites) if sites else int(cfg.federation.num_sites)


def _quiet(cfg: DictConfig, out_dir: Path) -> None:
    cfg.trainer.update(QUIET_TRAINER)
    cfg.trainer.default_root_dir = str(out_dir)
    cfg.paths.output_dir = str(out_dir)
    cfg.callbacks = None
    cfg.logger = None


def site_data(cfg: DictConfig, site: int) -> DictConfig:
    """Site ``site``'s data config: ``federation.sites[site].data`` over ``cfg.data`` (a ``source``
    with its own ``_target_`` replaces the global one whole), else a :class:`PartitionSource` of
    ``cfg.data.source`` (``federation.partition``, ``federation.alpha``, ``federation.seed``)."""
    fed, data = cfg.federation, cfg.data.copy()
    sites = fed.get("sites")
    with open_dict(data):
        if sites:
            own = sites[site].get("data") or {}
            if "_target_" in own.get("source", {}):
                data.source = own.source
            data = OmegaConf.merge(data, {k: v for k, v in own.items() if k != "source" or "_target_" not in v})
        else:
            data.source = {"_target_": PARTITION_TARGET, "source": cfg.data.source, "num_sites": num_sites(cfg),
                           "site": site, "scheme": fed.partition, "alpha": fed.alpha, "seed": fed.seed}
    return data


def site_config(cfg: DictConfig, site: int) -> DictConfig:
    """The config site ``site`` trains with (``cfg`` resolved): its data, its protections
    (``federation.sites[site].protect`` when given, else ``cfg.protect``), ``federation.local_epochs``
    per round, its own directory ``sites/site<i>`` and no checkpoints or loggers. It holds no other
    site's entry of ``federation.sites``."""
    site_cfg = cfg.copy()
    out_dir = Path(cfg.paths.output_dir) / "sites" / f"site{site}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = cfg.federation.get("sites")
    with open_dict(site_cfg):
        site_cfg.data = site_data(cfg, site)
        if sites and sites[site].get("protect") is not None:
            site_cfg.protect = sites[site].protect
        site_cfg.trainer.max_epochs = cfg.federation.local_epochs
        if site_cfg.get("protect") and "dp" in site_cfg.protect and site_cfg.protect.dp.get("planned_epochs") is None:
            # DP-SGD's budget covers every round: the site's accountant carries over from round to round
            site_cfg.protect.dp.planned_epochs = cfg.federation.rounds * cfg.federation.local_epochs
        site_cfg.federation.sites = None  # a site's config names its own data and keys, not the others'
        _quiet(site_cfg, out_dir)
    return site_cfg


def server_config(cfg: DictConfig) -> DictConfig:
    """The server's config (``cfg`` resolved): the global data and protections, a quiet trainer."""
    server_cfg = cfg.copy()
    with open_dict(server_cfg):
        _quiet(server_cfg, Path(cfg.paths.output_dir))
    return server_cfg


def trainer(run: Run, callbacks: list[L.Callback], **options: Any) -> L.Trainer:
    """``run``'s trainer with ``options`` over its trainer config (e.g. ``limit_val_batches=0``)."""
    cfg = run.cfg.copy()
    with open_dict(cfg):
        cfg.trainer.update(options)
    return dataclasses.replace(run, cfg=cfg).trainer(callbacks)
