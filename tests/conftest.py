"""Shared fixtures: tiny synthetic runs composed from the real configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from medsec.utils.config import REPO_ROOT, compose_config

os.environ.setdefault("WANDB_SILENT", "true")

TINY = [
    "data.source.num_samples=[192,64,64]",
    "data.source.image_size=24",
    "data.num_workers=0",
    "data.batch_size=32",
    "model.net.width=8",
    "trainer.max_epochs=2",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def run_verb(verb: str, overrides: Sequence[str], out: Path) -> dict:
    """Compose ``conf/<verb>.yaml`` and run the verb in-process; returns its metrics."""
    from medsec import attack as attack_verb
    from medsec import encrypt as encrypt_verb
    from medsec import eval as eval_verb
    from medsec import he as he_verb
    from medsec import train as train_verb

    cfg = compose_config(verb, overrides, output_dir=out)
    try:
        return {"train": train_verb.train, "eval": eval_verb.evaluate, "encrypt": encrypt_verb.encrypt,
                "attack": attack_verb.attack, "he": he_verb.homomorphic}[verb](cfg)
    finally:
        GlobalHydra.instance().clear()


def medsec_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m medsec ARGS`` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "medsec", *args], cwd=cwd or REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run trained long enough to classify well above chance (test accuracy about 0.8):
    attacks need a model with something to lose."""
    out = tmp_path_factory.mktemp("learned")
    run_verb("train", [*TINY, "trainer.max_epochs=10"], out)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny multi-class training run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("trained")
    run_verb("train", TINY, out)
    return out
