"""Run a medsec command from Python, as the command line would: tests, scripts and notebooks use
this instead of composing configs and calling command internals themselves."""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra

from medsec.utils.config import compose_config

COMMANDS: dict[str, str] = {
    "train": "medsec.commands.train:train",
    "eval": "medsec.commands.evaluate:evaluate",
    "predict": "medsec.commands.predict:predict",
    "attack": "medsec.commands.attack:attack",
    "audit": "medsec.commands.audit:audit",
    "federate": "medsec.commands.federate:federate",
    "encrypt": "medsec.commands.encrypt:encrypt",
    "he": "medsec.commands.he:homomorphic",
    "report": "medsec.commands.report:report",
}
"""Commands that run to completion and return their result (``serve`` runs until stopped)."""


def run(command: str, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> Any:
    """Compose ``conf/<command>.yaml`` with ``overrides`` and run ``command`` in this process, writing
    into ``run_dir``; returns what the command returns (metrics, a report, a summary). Errors are
    raised, not turned into exit codes."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {sorted(COMMANDS)}")
    module, function = COMMANDS[command].split(":")
    target = getattr(importlib.import_module(module), function)
    cfg = compose_config(command, overrides, output_dir=run_dir)
    try:
        return target(cfg)
    finally:
        GlobalHydra.instance().clear()
