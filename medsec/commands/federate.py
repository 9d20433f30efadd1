"""`medsec federate`: train one model across sites (hospitals) with Flower, without pooling their data.

Each site trains on its own data (a share of ``data`` or its own ``federation.sites[i]`` config,
behind its own protections); the server aggregates with ``federation.strategy``, evaluates the
global model on the global validation and test splits and writes a medsec checkpoint per round.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from medsec.core.app import hydra_app
from medsec.federated.federation import federate as run_federation


def federate(cfg: DictConfig) -> dict[str, Any]:
    """Run the federation ``cfg`` describes; returns the summary written to ``federated.json``."""
    return run_federation(cfg)


main = hydra_app("federate", federate)

if __name__ == "__main__":
    main()
