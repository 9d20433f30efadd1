"""The boilerplate every command shares: a Hydra app over its config that reports medsec errors as
one line and exit status 2."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.run import user_errors_exit


def hydra_app(config_name: str, command: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """The ``main`` of a command: a Hydra app over ``conf/<config_name>.yaml`` that runs ``command``
    and turns a medsec error (bad input, bad config) into one log line and exit status 2."""
    register_resolvers()
    run = user_errors_exit(command)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        return run(cfg)

    return main
