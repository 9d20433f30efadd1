"""The boilerplate every command shares: a Hydra app over its config that reports medsec errors as
one line and exit status 2.

``medsec <verb>`` builds the app with :func:`lazy_command`, so that Hydra composes the config and
prints ``--help`` before the command's module (and torch, Lightning, MONAI with it) is imported:
that import happens only when a job runs.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from medsec.errors import user_errors_exit
from medsec.utils.config import CONFIG_DIR, register_resolvers

Command = Callable[[DictConfig], Any]


def hydra_app(config_name: str, command: Command) -> Callable[[], Any]:
    """The ``main`` of a command: a Hydra app over ``conf/<config_name>.yaml`` that runs ``command``
    and turns a medsec error (bad input, bad config) into one log line and exit status 2. The
    command itself stays reachable as ``main.command``."""
    register_resolvers()
    run = user_errors_exit(command)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        return run(cfg)

    main.command = command  # type: ignore[attr-defined]
    return main


def lazy_command(module: str) -> Command:
    """The command of ``module.main`` (a :func:`hydra_app`), imported when it is first called."""

    def command(cfg: DictConfig) -> Any:
        return importlib.import_module(module).main.command(cfg)

    return command
