"""Shared fixtures: tiny synthetic runs composed from the real configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from medsec import api
from medsec.utils.config import REPO_ROOT

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower: no usage reports from tests
# One intra-op thread (unless OMP_NUM_THREADS says otherwise), here and in the CLI subprocesses and
# notebook kernels that inherit the environment: the test models are tiny, and on a machine whose
# cores are busy with other jobs torch's thread pool waits on descheduled threads (measured: the
# perceptual run's ten-epoch fixture took 26 s with 2 threads beside other jobs, 2 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
    """``medsec <verb> OVERRIDES`` in this process, writing into ``out``; returns its result."""
    return api.run(verb, overrides, out)


def medsec_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m medsec ARGS`` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "medsec", *args], cwd=cwd or REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def one_torch_thread() -> object:
    """Torch on one thread for the test: with tiny models, on a busy machine, the thread pool costs
    many times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


TINY_GAN = ["data.source.num_samples=[16,8,8]", "data.source.image_size=32", "data.batch_size=8",
            "data.num_workers=0", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null"]
HE_TINY = [
    "model=he_cnn", "model.net.image_size=12", "model.net.kernel_size=3", "model.net.stride=3",
    "model.net.channels=2", "model.net.hidden=[4]",
    "data.source.num_samples=[64,16,32]", "data.source.image_size=12", "data.source.num_classes=2",
    "data.num_workers=0", "data.batch_size=32", "trainer.max_epochs=1",
    "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "test=false",
]


@pytest.fixture(scope="session")
def gan_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny training run per learned cipher (DeepKeyGen, EncipherGAN), on synthetic images."""
    runs = {}
    for name in ("deepkeygen", "encipher_gan"):
        runs[name] = tmp_path_factory.mktemp(name)
        run_verb("train", [f"experiment={name}_synthetic", *TINY_GAN], runs[name])
    return runs


@pytest.fixture(scope="session")
def he_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny he_cnn (12x12 images, 2 classes) trained one epoch: what `medsec he` and `serve` load."""
    out = tmp_path_factory.mktemp("he_train")
    run_verb("train", HE_TINY, out)
    return out / "checkpoints" / "best.ckpt"
