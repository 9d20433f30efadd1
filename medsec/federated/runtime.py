"""Running a federation on one machine with Flower's simulation runtime.

``backend=ray`` is Flower's own: one Ray actor per ``cpus_per_site`` cores runs the sites' ClientApps.
``backend=inprocess`` runs the same ServerApp and ClientApps, through the same simulation engine
(in-memory SuperLink state, Grid, message queues, mods), but hands each message to the ClientApp in
the engine's worker thread, one at a time: no Ray cluster to start (seconds saved per run, and no
worker processes competing for two cores), and deterministic, which the tests need. Flower 1.42's
engine has no backend choice (it always builds its Ray backend), so the in-process backend is put in
its place for the duration of the run.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any
from unittest import mock

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server import ServerApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.simulation import run_simulation

from medsec.errors import ConfigError

BACKENDS = ("ray", "inprocess")


class InProcessBackend(Backend):
    """A simulation backend that runs ClientApps in the calling thread, one message at a time, each
    on its own copy of the message (workflows send one content object to many nodes, and mods such
    as SecAgg+'s change what they receive)."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise RuntimeError("InProcessBackend.build() was not called")
        reply = self.app_fn()(copy.deepcopy(message), context)  # each node its own copy, as over a wire
        return copy.deepcopy(reply), context


def simulate(server: ServerApp, client: ClientApp, num_sites: int, backend: str, cpus_per_site: float) -> None:
    """Run ``server`` with ``num_sites`` simulated nodes running ``client``."""
    if backend not in BACKENDS:
        raise ConfigError(f"federation.backend must be one of {list(BACKENDS)}, got '{backend}'")
    cpus = os.cpu_count() or 1
    if not 0 < cpus_per_site <= cpus:
        raise ConfigError(f"federation.cpus_per_site must be in (0, {cpus}], got {cpus_per_site}")
    config: dict[str, Any] = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                              "init_args": {"num_cpus": cpus, "include_dashboard": False}}
    if backend == "ray":
        run_simulation(server, client, num_supernodes=num_sites, backend_name="ray", backend_config=config)
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend  # imports Ray

    with mock.patch.object(raybackend, "RayBackend", InProcessBackend):
        run_simulation(server, client, num_supernodes=num_sites, backend_name="ray", backend_config=config)
