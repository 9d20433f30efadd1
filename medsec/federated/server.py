"""The server side of a federation: the Flower strategy (``federation.strategy``), wrapped by
:class:`FederatedStrategy`, which refuses malformed or stale updates before aggregation, evaluates
the global model on the global validation and test splits after every round, and writes
``rounds.csv`` and a round checkpoint in medsec's ordinary format (``medsec eval ckpt_path=...``
reads it unchanged)."""
from __future__ import annotations

import importlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
from flwr.app import ArrayRecord
from flwr.common import (
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from medsec.core.checkpoint import CHECKPOINT_KEY, CheckpointIO, read_checkpoint
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.federated.sites import trainer
from medsec.federated.weights import Layout, NDArrays, as_layout_floats, get_weights, set_weights
from medsec.utils.run import collect_metrics

log = logging.getLogger("medsec.federated")
STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam,
                                       "trimmed_mean": FedTrimmedAvg, "median": FedMedian, "krum": Krum}
NEEDS_EACH_UPDATE = ("trimmed_mean", "median", "krum")
"""Strategies that look at every site's update: impossible under secure aggregation."""
SERVER_STATE = ("current_weights", "m_t", "v_t")
"""A server optimiser's state (FedAdam), kept in the round checkpoint for resuming."""
NOT_AVERAGED = ("site", "round", "examples")
SITE_COLUMN = re.compile(r"site\d+/").match


ENCRYPTED_AGGREGATION = {"ckks": ("he_aggregation", "TenSEAL", ("tenseal",)),
                         "paillier": ("paillier_aggregation", "python-paillier and gmpy2", ("phe", "gmpy2"))}
"""``secure_aggregation`` values whose server adds ciphertexts: module, libraries, their imports."""


def aggregation_module(secure: str) -> ModuleType:
    """The module of encrypted aggregation ``secure`` (ckks, paillier), or a ``ConfigError`` when
    it or its libraries are absent."""
    name, libraries, imports = ENCRYPTED_AGGREGATION[secure]
    try:
        return importlib.import_module(f"medsec.federated.{name}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("medsec", *imports):
            raise ConfigError(f"federation.secure_aggregation={secure} needs medsec.federated.{name} and "
                              f"{libraries}, which this installation lacks ({err.name})") from None
        raise


def he_aggregation() -> ModuleType:
    """:mod:`medsec.federated.he_aggregation` (CKKS aggregation), or a ``ConfigError`` when absent."""
    return aggregation_module("ckks")


def encrypted_strategy(fed: DictConfig, strategy: Strategy) -> Strategy:
    """``strategy`` wrapped to add ciphertexts (``federation.secure_aggregation`` ckks or paillier),
    with the server's public context or key file."""
    if fed.secure_aggregation == "ckks":
        public = Path(fed.ckks.public_context).expanduser().read_bytes()
        return he_aggregation().CKKSAggregation(strategy, public)
    public = Path(fed.paillier.public_key).expanduser().read_bytes()
    return aggregation_module("paillier").PaillierAggregation(strategy, public)


def weighted_mean(pairs: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Scalar]:
    """The sites' metrics averaged, weighted by their example counts (what Flower logs per round)."""
    total = sum(n for n, _ in pairs) or 1
    keys = {k for _, m in pairs for k, v in m.items() if isinstance(v, (int, float)) and k not in NOT_AVERAGED}
    return {k: sum(n * float(m[k]) for n, m in pairs if k in m) / total for k in sorted(keys)}


def min_sites(fed: DictConfig) -> int:
    """The fewest sites a round trains or evaluates with: ``federation.min_sites``, else 1 (the
    fractions decide)."""
    return int(fed.min_sites) if fed.get("min_sites") else 1


def sampled_sites(fed: DictConfig, sites: int) -> int:
    """How many sites train each round (Flower's ``FedAvg.num_fit_clients``)."""
    return max(int(sites * float(fed.fraction_fit)), min_sites(fed))


def build_strategy(fed: DictConfig, sites: int, initial: Parameters) -> Strategy:
    """The Flower strategy ``federation.strategy`` (options from ``federation.strategy_options``),
    wrapped for client-level DP when ``federation.client_dp`` is set."""
    name = fed.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"federation.strategy must be one of {sorted(STRATEGIES)}, got '{name}'")
    least = min_sites(fed)
    options: dict[str, Any] = {
        "fraction_fit": float(fed.fraction_fit), "fraction_evaluate": float(fed.fraction_evaluate),
        "min_fit_clients": least, "min_evaluate_clients": least, "min_available_clients": sites,
        "accept_failures": True, "initial_parameters": initial,
        "fit_metrics_aggregation_fn": weighted_mean, "evaluate_metrics_aggregation_fn": weighted_mean}
    if name == "fedprox":
        options["proximal_mu"] = float(fed.proximal_mu)
    options.update(OmegaConf.to_container(fed.strategy_options) if fed.get("strategy_options") else {})
    try:
        strategy = STRATEGIES[name](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"federation.strategy_options (strategy={name}): {err}") from None
    sampled = sampled_sites(fed, sites)
    if name == "trimmed_mean" and int(strategy.beta * sampled) == 0:
        raise ConfigError(f"federation.strategy_options.beta={strategy.beta} trims nothing from {sampled} sites "
                          f"(it cuts int(beta * sites) from each end); use beta >= {1 / sampled:.3f}")
    dp = fed.get("client_dp")
    if dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=float(dp.noise_multiplier), clipping_norm=float(dp.clipping_norm),
            num_sampled_clients=sampled)
    return strategy


def base_strategy(strategy: Strategy) -> Strategy:
    """The innermost strategy of a chain of wrappers (DP, CKKS)."""
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


@dataclass
class Traffic:
    """Bytes of the records the server sent and received (arrays, configs, metrics)."""

    sent: int = 0
    received: int = 0


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(map(_value_bytes, value))
    return len(value) if isinstance(value, (bytes, str)) else 1 if isinstance(value, bool) else 8


def content_bytes(message: Any) -> int:
    """The bytes a message carries: its arrays' data, and its config and metric keys and values
    (numbers as 8 bytes, as Flower counts them; its own ``count_bytes`` fails on empty lists)."""
    if not message.has_content():
        return 0
    return sum(record.count_bytes() if isinstance(record, ArrayRecord)
               else sum(len(k) + _value_bytes(v) for k, v in record.items()) for record in message.content.values())


class MeteredGrid:
    """A Flower ``Grid`` that counts the bytes of the messages the workflows exchange through it and
    logs the node of every error reply (a site that crashed or vanished)."""

    def __init__(self, grid: Grid, traffic: Traffic) -> None:
        self._grid, self._traffic = grid, traffic

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        self._traffic.sent += sum(map(content_bytes, messages))
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._traffic.received += sum(map(content_bytes, replies))
        for reply in replies:
            if reply.has_error():
                log.warning("node %s replied with an error: %s", reply.metadata.src_node_id, reply.error.reason)
        return replies


class GlobalModel:
    """The server's copy of the model (its medsec :class:`Run` over the global data)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.layout = Layout.of(run.task)
        self.trainer: L.Trainer | None = None

    def weights(self) -> NDArrays:
        return get_weights(self.run.task, self.layout)

    def load(self, arrays: NDArrays) -> None:
        set_weights(self.run.task, self.layout, arrays, "the aggregated model")

    def stamp(self, server_round: int) -> dict[str, Scalar]:
        """What every instruction carries: the round, the model's layout and the class names."""
        return {"round": server_round, "layout": self.layout.digest,
                "classes": json.dumps(list(self.run.datamodule.class_names))}

    def evaluate(self) -> dict[str, float | None]:
        """Validation and test metrics of the current weights on the global data."""
        self.trainer = trainer(self.run, [])
        self.trainer.validate(self.run.task, datamodule=self.run.datamodule, verbose=False)
        metrics = collect_metrics(self.trainer.callback_metrics)
        self.trainer.test(self.run.task, datamodule=self.run.datamodule, verbose=False)
        return {**metrics, **collect_metrics(self.trainer.callback_metrics)}

    def save(self, path: Path, server_round: int, federation: dict[str, Any]) -> None:
        """A medsec checkpoint (what ``medsec train`` writes: weights, hyper-parameters, run info),
        sealed when a protection seals, with the federation's state under ``federation``."""
        task = self.run.task
        payload = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                   CHECKPOINT_KEY: self.run.info, "epoch": server_round, "global_step": server_round,
                   "pytorch-lightning_version": L.__version__, "federation": federation}
        CheckpointIO(self.run.protections.sealer, self.run.out_dir).save_checkpoint(payload, path)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a round checkpoint's weights; returns its ``federation`` entry."""
        where = f"ckpt_path: {path}"
        payload = read_checkpoint(path, self.run.protections.sealer)
        state = payload.get("federation")
        if not isinstance(state, Mapping) or not isinstance(state.get("round"), int):
            raise ConfigError(f"{where} is not a `medsec federate` round checkpoint (no federation.round)")
        try:
            self.run.task.load_state_dict(payload["state_dict"], strict=True)
        except (KeyError, RuntimeError) as err:
            raise ConfigError(f"{where}: its weights do not fit this model ({str(err).splitlines()[0][:200]})") from None
        return dict(state)


class FederatedStrategy(Strategy):
    """Wraps a Flower strategy: every update is checked (round, example count, number, shapes and
    dtypes of the arrays, finite values) and a refused one is logged with its site and node and
    treated as a failure (the round goes on with the others); after every round the global model
    is evaluated on the server, ``rounds.csv`` is rewritten and ``checkpoints/round_<r>.ckpt`` and
    ``checkpoints/last.ckpt`` are written, and ``checkpoints/best.ckpt`` when the round is the best
    so far on the run's monitor (the rule ``medsec train`` picks its checkpoint by). Rounds are numbered from ``start_round`` on (resuming).
    ``encrypted``: the server only ever holds ciphertexts (CKKS, Paillier): no array checks, no evaluation,
    no checkpoints. ``masked``: SecAgg+ (each result holds the unmasked sum). ``loggers`` (the run's
    ``logger`` group: W&B, CSV, TensorBoard) receive each finished round's row, step = round."""

    def __init__(self, strategy: Strategy, model: GlobalModel, name: str, num_rounds: int, start_round: int = 0,
                 rows: list[dict[str, Any]] | None = None, encrypted: bool = False,
                 masked: bool = False, loggers: Sequence[Logger] = (), best: dict[str, Any] | None = None) -> None:
        self.strategy, self.model, self.name = strategy, model, name
        self.num_rounds, self.offset, self.encrypted, self.masked = num_rounds, start_round, encrypted, masked
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.loggers, self._logged = list(loggers), start_round if rows else -1
        self.best = best  # the best round so far on the run's monitor (resumed from the checkpoint)
        self.traffic = Traffic()
        self.refused: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.examples: dict[int, int] = {}
        self._round: dict[str, Any] = {}
        self._sampled = 0
        self._start = (time.perf_counter(), 0, 0)

    def __repr__(self) -> str:
        return f"FederatedStrategy({self.strategy!r})"

    # ---- training ------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.model.weights())

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._start = (time.perf_counter(), self.traffic.sent, self.traffic.received)
        rnd = server_round + self.offset
        instructions = self.strategy.configure_fit(rnd, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self.model.stamp(rnd))
        self._sampled = len(instructions)
        return instructions

    def problem(self, res: FitRes, rnd: int) -> str | None:
        """Why the update ``res`` is refused in round ``rnd``, or ``None``."""
        if not isinstance(res.metrics.get("site"), int):
            return "its metrics name no site index"
        if res.metrics.get("round") != rnd:
            return f"it was trained for round {res.metrics.get('round')}, this is round {rnd}"
        if not isinstance(res.num_examples, int) or res.num_examples < 1:
            return f"num_examples={res.num_examples}"
        if self.encrypted:
            return None
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # noqa: BLE001 - np.load of untrusted bytes: any failure means unreadable
            return f"unreadable arrays ({type(err).__name__})"
        if self.masked:  # SecAgg+ hands over its dequantised (float64) sum, not the site's own arrays
            arrays = as_layout_floats(arrays, self.model.layout)
        return self.model.layout.problem(arrays)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rnd = server_round + self.offset
        kept, refused = [], []
        for proxy, res in results:
            site, reason = res.metrics.get("site", "?"), self.problem(res, rnd)
            if reason is None:
                kept.append((proxy, res))
                examples = res.metrics.get("examples")  # the true count (the weight is 1 under client DP)
                self.examples[site] = examples if isinstance(examples, int) else res.num_examples
                continue
            log.warning("round %d: refused the update of site %s (node %s): %s", rnd, site, proxy.node_id, reason)
            self.refused.append({"round": rnd, "site": site, "node": proxy.node_id, "reason": reason})
            refused.append((proxy, res))
        reasons = [str(f if isinstance(f, BaseException) else f[1].status.message)[:500] for f in failures]
        for reason in dict.fromkeys(reasons):  # SecAgg+ reports a site that dropped out twice
            log.warning("round %d: a site failed: %s", rnd, reason)
            self.failures.append({"round": rnd, "reason": reason})
        if failures and not results:
            raise ConfigError(f"round {rnd}: every site failed; the first: {reasons[0]}")
        self._round = {"sites_ok": len(kept), "sites_refused": len(refused),
                       "sites_failed": max(self._sampled - len(results), 0)}
        for _, res in kept:  # sample-level DP (protect=[dp]) at a site: what it has spent so far
            site = res.metrics["site"]
            self._round[f"site{site}/train_loss"] = res.metrics.get("train/loss")
            if "dp/epsilon" in res.metrics:
                self._round[f"site{site}/dp_epsilon"] = res.metrics["dp/epsilon"]
        kept.sort(key=lambda item: item[1].metrics["site"])  # a fixed order: sums do not depend on sampling
        parameters, metrics = self.strategy.aggregate_fit(rnd, kept, [*failures, *refused])
        if parameters is None:
            log.warning("round %d: nothing aggregated; the global model stays as it was", rnd)
        return parameters, metrics

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate the global model on the server, record the round and write its checkpoint."""
        rnd = server_round + self.offset
        if server_round == 0 and self.offset:
            return None  # resumed: the checkpoint's round was evaluated before
        if rnd > 0 and not self._round:  # aggregate_fit never ran: e.g. SecAgg+ halted for lack of sites
            log.warning("round %d: no site's update was aggregated; the global model stays as it was", rnd)
            self._round = {"sites_ok": 0}
        self.log_rounds()  # the rows before this one are complete
        metrics: dict[str, float | None] = {}
        if not self.encrypted:
            self.model.load(parameters_to_ndarrays(parameters))
            metrics = self.model.evaluate()
        self.rows.append({"round": rnd, **self._round, **metrics})
        self._round = {}
        self._account(self.rows[-1])
        if rnd > 0 and not self.encrypted:
            best = self.improves(metrics)
            if best:
                self.best = {"round": rnd, **{k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}}
            state = {"round": rnd, "num_rounds": self.num_rounds, "strategy": self.name, "rows": self.rows,
                     "best": self.best, "server_state": self.server_state()}
            checkpoints = self.model.run.out_dir / "checkpoints"
            for name in (f"round_{rnd:03d}.ckpt", "last.ckpt", *(["best.ckpt"] if best else [])):
                self.model.save(checkpoints / name, rnd, state)
        self.write_rows()
        shown = {k: v for k, v in metrics.items() if k in ("val/loss", "val/auroc", "test/auroc") and v is not None}
        log.info("round %d/%d: %s", rnd, self.num_rounds, ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) or "done")
        loss = metrics.get("val/loss")
        return (math.nan if loss is None else loss), {k: v for k, v in metrics.items() if v is not None}

    def improves(self, metrics: Mapping[str, float | None]) -> bool:
        """Whether ``metrics`` beat the best round so far on the run's monitor (``val/auroc``, ...)."""
        monitor, mode = self.model.run.monitor
        value, best = metrics.get(monitor), (self.best or {}).get(monitor)
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value > best if mode == "max" else value < best)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        rnd = server_round + self.offset
        instructions = self.strategy.configure_evaluate(rnd, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self.model.stamp(rnd))
        return instructions

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:
        """The sites' validation results: added to the round's row (``site<i>/val_...``)."""
        rnd = server_round + self.offset
        if self.rows and self.rows[-1]["round"] == rnd:
            for _, res in results:
                site = res.metrics.get("site", "?")
                self.rows[-1].update({f"site{site}/val_loss": res.loss,
                                      **{f"site{site}/{k}": v for k, v in res.metrics.items() if k == "val/auroc"}})
            self._account(self.rows[-1])
            self.write_rows()
        return self.strategy.aggregate_evaluate(rnd, results, failures)

    # ---- records -------------------------------------------------------------------------
    def _account(self, row: dict[str, Any]) -> None:
        """Time and bytes of the round so far (its training, aggregation and evaluation)."""
        began, sent, received = self._start
        if row["round"] == 0:
            row.update(seconds=0.0, bytes_sent=0, bytes_received=0)
            return
        row.update(seconds=round(time.perf_counter() - began, 3), bytes_sent=self.traffic.sent - sent,
                   bytes_received=self.traffic.received - received)

    def write_rows(self) -> None:
        """``rounds.csv``: one row per round (through the run's writer: sealed when outputs are)."""
        header: list[str] = ["round", "seconds", "bytes_sent", "bytes_received"]
        for row in self.rows:
            header += [k for k in row if k not in header and not SITE_COLUMN(k)]
        header += sorted({k for row in self.rows for k in row if SITE_COLUMN(k)})
        self.model.run.writer.write_table("rounds", header, [[row.get(k, "") for k in header] for row in self.rows])

    def log_rounds(self) -> None:
        """Send the rows not sent yet to the loggers: numeric values, step = round; the round's own
        columns (seconds, bytes, sites) under ``round/``."""
        for row in self.rows:
            if row["round"] <= self._logged:
                continue
            metrics = {(k if "/" in k else f"round/{k}"): float(v) for k, v in row.items()
                       if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=row["round"])
            self._logged = row["round"]
        for logger in self.loggers:
            logger.save()

    def server_state(self) -> dict[str, list[torch.Tensor]]:
        """The server optimiser's state (FedAdam's moments), for resuming."""
        inner = base_strategy(self.strategy)
        return {name: [torch.from_numpy(a.copy()) for a in getattr(inner, name)]
                for name in SERVER_STATE if isinstance(getattr(inner, name, None), list)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Put back :meth:`server_state` from a round checkpoint."""
        inner = base_strategy(self.strategy)
        for name, tensors in (state or {}).items():
            if name in SERVER_STATE and hasattr(inner, name):
                setattr(inner, name, [t.numpy() for t in tensors])

    def summary(self) -> dict[str, Any]:
        """What ``federated.json`` reports about the rounds."""
        last = self.rows[-1] if self.rows else {}
        trained = [row for row in self.rows if row["round"] > 0]
        return {
            "strategy": self.name, "rounds": last.get("round", 0), "num_rounds": self.num_rounds,
            "final": {k: v for k, v in last.items() if k.startswith(("val/", "test/"))},
            "best": self.best, "monitor": self.model.run.monitor[0],
            "site_examples": {str(site): n for site, n in sorted(self.examples.items())},
            "refused": self.refused, "failures": self.failures,
            "seconds": round(sum(row.get("seconds", 0.0) for row in trained), 3),
            "bytes_sent": sum(row.get("bytes_sent", 0) for row in trained),
            "bytes_received": sum(row.get("bytes_received", 0) for row in trained),
        }


def server_app(strategy: FederatedStrategy, num_rounds: int, fit_workflow: Any = None) -> ServerApp:
    """A ServerApp running Flower's default workflow (``fit_workflow``: e.g. SecAgg+) for
    ``num_rounds`` rounds with ``strategy``, through a grid that counts the bytes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=fit_workflow)(MeteredGrid(grid, strategy.traffic), legacy)

    return app
