"""The Flower client of one site: load the global weights (checked), train ``local_epochs`` with the
site's medsec run (its protections included, e.g. DP-SGD), return the weights, the number of
examples and the training metrics; evaluate on the site's validation split.

``federation.hostile`` makes chosen sites misbehave (scaled or sign-flipped updates, NaN, wrong
shapes or counts, a stale round, a crash): robustness experiments for the server's checks and the
robust strategies.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, Scalar
from omegaconf import DictConfig, OmegaConf

from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.federated.sites import site_config, trainer
from medsec.federated.weights import Layout, NDArrays, get_weights, set_weights
from medsec.utils.run import collect_metrics

log = logging.getLogger("medsec.federated")
PARTITION_ID = "partition-id"
"""Flower's node config key for the simulated node's index: the site index."""
HOSTILE = ("scale", "sign_flip", "non_finite", "wrong_shape", "wrong_count", "wrong_round", "crash")
_SITES: dict[tuple[str, int], SiteClient] = {}
"""Per process, every site's client (its run, data and protections' state) built once and kept
across rounds (Ray passes the ClientApp anew with every message)."""


class ProximalTerm(L.Callback):
    """FedProx (Li et al. 2020): adds ``mu (w - w_global)``, the gradient of ``mu/2 ||w - w_global||^2``,
    to every parameter's gradient before each optimiser step: the same as adding the term to the loss."""

    def __init__(self, mu: float, task: L.LightningModule) -> None:
        self.mu = float(mu)
        self.anchor = {name: p.detach().clone() for name, p in task.named_parameters()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                p.grad.add_(p.detach() - self.anchor[name], alpha=self.mu)


def tamper(kind: str, factor: float, sent: NDArrays, received: NDArrays) -> NDArrays:
    """What a hostile site sends instead of its weights ``sent`` (``received``: the global ones)."""
    if kind in ("scale", "sign_flip"):  # well-formed updates, in the site's own dtypes: only robust aggregation helps
        sign = 1.0 if kind == "scale" else -1.0
        return [(g + sign * factor * (w - g)).astype(w.dtype) for w, g in zip(sent, received)]
    if kind == "non_finite":
        return [np.full_like(sent[0], np.nan), *sent[1:]]
    if kind == "wrong_shape":
        return [sent[0].ravel()[:-1], *sent[1:]]
    if kind == "wrong_count":
        return sent[:-1]
    return sent


def hostile_behaviour(cfg: DictConfig, site: int) -> tuple[str, float] | None:
    """``(kind, factor)`` when ``federation.hostile`` lists ``site``."""
    for entry in cfg.federation.get("hostile") or []:
        if int(entry.site) == site:
            return str(entry.kind), float(entry.get("factor", 1.0))
    return None


def _scalars(metrics: Mapping[str, float | None], prefix: str = "") -> dict[str, Scalar]:
    return {prefix + k: float(v) for k, v in metrics.items() if v is not None}


class SiteClient(NumPyClient):
    """One site: its medsec :class:`Run`, built once from :func:`site_config`."""

    def __init__(self, cfg: DictConfig, site: int) -> None:
        self.cfg, self.site = cfg, site
        self.run = Run.build(site_config(cfg, site))
        self.layout = Layout.of(self.run.task)
        self.where = f"site {site}"
        self.hostile = hostile_behaviour(cfg, site)
        if self.hostile:
            log.warning("%s is hostile for this experiment: %s x%g", self.where, *self.hostile)

    def _receive(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> None:
        if config.get("layout") not in (None, self.layout.digest):
            raise ConfigError(f"{self.where}: its model differs from the server's (model or data classes differ)")
        classes = config.get("classes")
        if classes is not None and json.loads(str(classes)) != list(self.run.datamodule.class_names):
            raise ConfigError(f"{self.where}: classes {self.run.datamodule.class_names} differ from the "
                              f"server's {json.loads(str(classes))}")
        set_weights(self.run.task, self.layout, parameters, self.where)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.run.task, self.layout)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config.get("round", 0))
        if self.hostile and self.hostile[0] == "crash":
            raise RuntimeError(f"{self.where}: simulated crash in round {server_round}")
        self._receive(parameters, config)
        L.seed_everything(int(self.cfg.seed) + 1000 * max(server_round - 1, 0) + self.site, workers=True,
                          verbose=False)
        mu = float(config.get("proximal_mu", 0.0))
        fit_trainer = trainer(self.run, self.run.callbacks([ProximalTerm(mu, self.run.task)] if mu else []),
                              limit_val_batches=0)
        fit_trainer.fit(self.run.task, datamodule=self.run.datamodule)
        metrics = collect_metrics(fit_trainer.callback_metrics)
        arrays = get_weights(self.run.task, self.layout)
        if self.hostile:
            arrays = tamper(*self.hostile, arrays, list(parameters))
            if self.hostile[0] == "wrong_round":
                server_round -= 1
        examples = len(self.run.datamodule.datasets["train"])
        report = {"site": self.site, "round": server_round, "examples": examples,
                  **_scalars({k: v for k, v in metrics.items() if k.startswith(("train/", "dp/"))})}
        # client-level DP bounds each site's influence: equal weights, not example counts
        weight = 1 if self.cfg.federation.get("client_dp") else examples
        return arrays, weight, report

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        self._receive(parameters, config)
        eval_trainer = trainer(self.run, [])
        eval_trainer.validate(self.run.task, datamodule=self.run.datamodule, verbose=False)
        metrics = collect_metrics(eval_trainer.callback_metrics)
        loss = metrics.get("val/loss")
        examples = len(self.run.datamodule.datasets["val"])
        return float("nan") if loss is None else loss, examples, {"site": self.site, **_scalars(metrics)}


def site_client(cfg: DictConfig, site: int) -> SiteClient:
    """Site ``site``'s client, built on first use in this process."""
    key = (str(cfg.paths.output_dir), site)
    if key not in _SITES:
        _SITES[key] = SiteClient(cfg, site)
    return _SITES[key]


def forget_sites(output_dir: str) -> None:
    """Drop the clients of the federation writing to ``output_dir`` (when it ends)."""
    for key in [k for k in _SITES if k[0] == output_dir]:
        del _SITES[key]


def client_app(cfg: Mapping[str, Any], mods: list[Any]) -> ClientApp:
    """The ClientApp every simulated node runs; the node's partition id is its site index. ``cfg``:
    the resolved config (plain data, so that it travels to Ray workers)."""

    def client_fn(context: Context) -> Client:
        return site_client(OmegaConf.create(cfg), int(context.node_config[PARTITION_ID])).to_client()

    return ClientApp(client_fn=client_fn, mods=mods)


def client_mods(cfg: DictConfig) -> list[Any]:
    """Flower mods around the site's code: CKKS or Paillier encryption or SecAgg+ masking outermost,
    then the clipping of client-level DP (it must see the update before it is masked or encrypted)."""
    fed = cfg.federation
    mods: list[Any] = []
    if fed.get("secure_aggregation") == "secagg+":
        mods.append(secaggplus_mod)
    elif fed.get("secure_aggregation") == "ckks":
        from medsec.federated.server import he_aggregation

        mods.append(he_aggregation().ckks_mod(fed.ckks.site_context))
    elif fed.get("secure_aggregation") == "paillier":
        from medsec.federated.server import aggregation_module

        mods.append(aggregation_module("paillier").paillier_mod(fed.paillier.site_key))
    if fed.get("client_dp"):
        mods.append(fixedclipping_mod)
    return mods
