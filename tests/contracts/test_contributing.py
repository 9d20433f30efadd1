"""CONTRIBUTING.md's worked examples run as written (in order, in one namespace)."""
from __future__ import annotations

import re

from medsec.core import registry
from medsec.utils.config import REPO_ROOT

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_every_worked_example_runs(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {kind: set(targets) for kind, targets in registry._REGISTRY.items()})
    blocks = BLOCK.findall((REPO_ROOT / "CONTRIBUTING.md").read_text())
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "contributing_examples"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"CONTRIBUTING.md block {number + 1}", "exec"), namespace)
