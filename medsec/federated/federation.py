"""`medsec federate`: check the federation config, build the server's model, the strategy and the
apps, run the simulation, and write ``federated.json`` and ``metrics.json``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp
from flwr.server.workflow import SecAggPlusWorkflow
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.federated.client import HOSTILE, client_app, client_mods, forget_sites
from medsec.federated.privacy import client_level_epsilon
from medsec.federated.runtime import simulate
from medsec.federated.server import (
    ENCRYPTED_AGGREGATION,
    NEEDS_EACH_UPDATE,
    FederatedStrategy,
    GlobalModel,
    build_strategy,
    encrypted_strategy,
    sampled_sites,
    server_app,
)
from medsec.federated.sites import num_sites, server_config
from medsec.models.norms import batch_norm_modules
from medsec.utils.run import instantiate_list, resolved_config

log = logging.getLogger("medsec.federated")
SECURE_AGGREGATION = (None, "secagg+", *ENCRYPTED_AGGREGATION)
KEY_FILES = {"ckks": ("site_context", "public_context"), "paillier": ("site_key", "public_key")}
"""The key files encrypted aggregation needs: the sites' secret one and the server's public one."""
SECAGG_MIN_SITES = 3


def check_encrypted(fed: DictConfig, secure: str) -> None:
    """Refuse what encrypted aggregation (ckks, paillier) cannot do, and missing key files."""
    if fed.strategy == "fedadam" or fed.get("client_dp"):
        raise ConfigError(f"federation.secure_aggregation={secure}: the server only adds ciphertexts, so it cannot "
                          "run FedAdam's optimiser or client-level DP's clipping and noise on the aggregate; use "
                          "fedavg or fedprox without client_dp")
    site, server = KEY_FILES[secure]
    if not (fed.get(secure) and fed[secure].get(site) and fed[secure].get(server)):
        raise ConfigError(f"federation.secure_aggregation={secure} needs federation.{secure}.{site} (the sites' "
                          f"secret file) and federation.{secure}.{server} (the server's public one)")


def check(cfg: DictConfig) -> None:
    """Refuse (``ConfigError`` naming the field) settings the federation cannot honour."""
    fed, sites = cfg.federation, num_sites(cfg)
    for name in ("rounds", "local_epochs"):
        if not isinstance(fed[name], int) or fed[name] < 1:
            raise ConfigError(f"federation.{name} must be a positive integer, got {fed[name]!r}")
    if sites < 1:
        raise ConfigError(f"federation.num_sites must be a positive integer, got {sites}")
    if fed.get("min_sites") is not None and not 1 <= fed.min_sites <= sites:
        raise ConfigError(f"federation.min_sites must be in [1, {sites}] (the sites there are), got {fed.min_sites}")
    for name in ("fraction_fit", "fraction_evaluate"):
        if not 0 <= fed[name] <= 1:
            raise ConfigError(f"federation.{name} must be in [0, 1], got {fed[name]}")
    secure = fed.get("secure_aggregation")
    if secure not in SECURE_AGGREGATION:
        raise ConfigError(f"federation.secure_aggregation must be one of {list(SECURE_AGGREGATION)}, got '{secure}'")
    if secure and fed.strategy in NEEDS_EACH_UPDATE:
        raise ConfigError(f"federation.strategy={fed.strategy} needs every site's update in the clear, which "
                          f"secure_aggregation={secure} hides; use fedavg, fedprox or fedadam")
    if secure == "secagg+" and sites < SECAGG_MIN_SITES:
        raise ConfigError(f"federation.secure_aggregation=secagg+ needs at least {SECAGG_MIN_SITES} sites "
                          f"(with two, each site could subtract its own update from the sum); got {sites}")
    if secure in ENCRYPTED_AGGREGATION:
        check_encrypted(fed, secure)
    protects = [cfg.get("protect") or {}, *((site.get("protect") or {}) for site in fed.get("sites") or [])]
    if fed.strategy == "fedprox" and any("dp" in protect for protect in protects):
        raise ConfigError("federation.strategy=fedprox with protect=[dp]: the DP optimiser rebuilds the gradient from "
                          "per-sample gradients and would drop the proximal term; use fedavg")
    dp = fed.get("client_dp")
    if dp:
        for name in ("noise_multiplier", "clipping_norm", "delta"):
            if dp.get(name) is None or not dp[name] >= 0:
                raise ConfigError(f"federation.client_dp.{name} must be a non-negative number, got {dp.get(name)}")
        if not dp.clipping_norm > 0 or not 0 < dp.delta < 1:
            raise ConfigError("federation.client_dp: clipping_norm must be positive and delta in (0, 1)")
    for entry in fed.get("hostile") or []:
        if entry.get("kind") not in HOSTILE or not 0 <= int(entry.get("site", -1)) < sites:
            raise ConfigError(f"federation.hostile: each entry needs a site in [0, {sites - 1}] and a kind in "
                              f"{list(HOSTILE)}, got {OmegaConf.to_container(entry)}")


def resolve(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every interpolation resolved (``trainer.max_epochs`` set to the local epochs
    first, so that schedules follow them): plain data that travels to the sites."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.max_epochs = cfg.federation.local_epochs
    return OmegaConf.create(resolved_config(cfg))


def resume_point(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The round checkpoint to resume from: ``ckpt_path``, else ``checkpoints/last.ckpt`` of this
    run directory when ``federation.resume`` (none there: start afresh)."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.federation.get("resume"):
        if last.is_file():
            return last
        log.info("federation.resume: no %s yet; starting at round 1", last)
    return None


def client_dp_report(cfg: DictConfig, sites: int, rounds: int) -> dict[str, Any] | None:
    """Client-level DP settings and the epsilon the completed rounds spent (Opacus RDP)."""
    dp = cfg.federation.get("client_dp")
    if not dp:
        return None
    rate = sampled_sites(cfg.federation, sites) / sites
    return {"noise_multiplier": float(dp.noise_multiplier), "clipping_norm": float(dp.clipping_norm),
            "delta": float(dp.delta), "sample_rate": rate, "rounds": rounds, "accountant": "opacus rdp",
            "epsilon": client_level_epsilon(rate, float(dp.noise_multiplier), rounds, float(dp.delta))}


@dataclass
class Server:
    """The server side of a federation: its run, global model, wrapped strategy and workflow, and
    the rounds left to train."""

    cfg: DictConfig
    run: Run
    model: GlobalModel
    strategy: FederatedStrategy
    workflow: Any
    remaining: int

    def app(self) -> ServerApp:
        """The ServerApp that trains the remaining rounds."""
        return server_app(self.strategy, self.remaining, self.workflow)


def round_loggers(cfg: DictConfig, run: Run) -> list[Logger]:
    """The ``logger`` group's loggers (W&B, CSV, ...) for the per-round metrics, with the resolved
    config as hyper-parameters; none when outputs are sealed (``rounds.csv`` is sealed instead)."""
    loggers = instantiate_list(cfg.get("logger"))
    if loggers and getattr(run.protections.sealer, "encrypt_outputs", False):
        raise ConfigError(f"logger: {', '.join(type(lg).__name__ for lg in loggers)} would keep the round metrics "
                          "in clear, which sealed outputs forbid; rounds.csv is sealed: use logger=none")
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))
    return loggers


def prepare(cfg: DictConfig) -> Server:
    """The server of the federation ``cfg`` (checked and resolved) describes, resumed when asked."""
    fed, sites = cfg.federation, num_sites(cfg)
    run = Run.build(server_config(cfg))
    if fed.get("client_dp") and batch_norm_modules(run.task.net):
        raise ConfigError("federation.client_dp: the noise would reach BatchNorm's running statistics "
                          f"({batch_norm_modules(run.task.net)[:3]}); set model.batch_norm=group")
    model = GlobalModel(run)
    start, state = 0, {}
    checkpoint = resume_point(cfg, run.out_dir)
    if checkpoint is not None:
        state = model.resume(checkpoint)
        start = state["round"]
        log.info("resuming after round %d from %s", start, checkpoint)
    strategy = build_strategy(fed, sites, ndarrays_to_parameters(model.weights()))
    secure = fed.get("secure_aggregation")
    if secure in ENCRYPTED_AGGREGATION:
        strategy = encrypted_strategy(fed, strategy)
    federated = FederatedStrategy(strategy, model, fed.strategy, fed.rounds, start, state.get("rows"),
                                  encrypted=secure in ENCRYPTED_AGGREGATION, masked=secure == "secagg+",
                                  loggers=round_loggers(cfg, run), best=state.get("best"))
    federated.restore(state.get("server_state") or {})
    workflow = SecAggPlusWorkflow(**OmegaConf.to_container(fed.secagg)) if secure == "secagg+" else None
    remaining = fed.rounds - start
    if remaining > 0:
        log.info("federation: %d sites, %d rounds of %d local epoch(s), %s%s", sites, remaining, fed.local_epochs,
                 fed.strategy, f", {secure}" if secure else "")
    else:
        log.info("federation: all %d rounds were done before; nothing to train", fed.rounds)
    return Server(cfg, run, model, federated, workflow, remaining)


def conclude(server: Server) -> dict[str, Any]:
    """Write ``federated.json`` (returned) and ``metrics.json`` after the rounds."""
    cfg, fed, sites = server.cfg, server.cfg.federation, num_sites(server.cfg)
    server.strategy.log_rounds()
    for logger in server.strategy.loggers:
        logger.finalize("success")
    rounds = server.strategy.summary()
    summary = {**rounds, "num_sites": sites, "local_epochs": fed.local_epochs,
               "partition": None if fed.get("sites") else {"scheme": fed.partition, "alpha": fed.alpha},
               "secure_aggregation": fed.get("secure_aggregation"), "backend": fed.backend,
               "client_dp": client_dp_report(cfg, sites, rounds["rounds"])}
    server.run.writer.write_json("federated.json", summary)
    if server.model.trainer is not None:
        server.run.publish(dict(summary["final"]), server.model.trainer)
    return summary


def federate(cfg: DictConfig) -> dict[str, Any]:
    """Run the federation ``cfg.federation`` describes; returns the summary in ``federated.json``.
    ``federation.backend=deployment`` runs it as a SuperLink and SuperNodes on this machine
    (:mod:`medsec.federated.deployment`); the other backends simulate it."""
    check(cfg)
    cfg = resolve(cfg)
    fed = cfg.federation
    if fed.backend == "deployment":
        from medsec.federated.deployment import deploy

        return deploy(cfg)
    server = prepare(cfg)
    if server.remaining > 0:
        try:
            client = client_app(OmegaConf.to_container(cfg), client_mods(cfg))
            simulate(server.app(), client, num_sites(cfg), fed.backend, float(fed.cpus_per_site))
        finally:
            forget_sites(str(cfg.paths.output_dir))
    return conclude(server)
