"""DDP child processes under Hydra.

Lightning starts ranks 1..N-1 by re-running the parent's command line. Under ``medsec <verb>``
that command line is not re-runnable as is, and in a multirun (``-m``) the children would start the
whole sweep again. We give Lightning a command that re-runs exactly this job: the verb, this job's
own overrides, its run directory, and ``hydra.mode=RUN``. After each job, :func:`job_scope`
tears the process group down and removes the rank variables Lightning put into the parent's
environment, so the next job of a sweep starts its own ranks instead of waiting for dead ones.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig


def job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts DDP rank ``local_rank`` of the current Hydra job."""
    hc = HydraConfig.get()
    command = [
        sys.executable, "-m", "medsec", hc.job.config_name,
        *hc.overrides.task,
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, hc.runtime.cwd or os.getcwd()


def install_job_command() -> None:
    """Make Lightning's subprocess launcher use :func:`job_command`."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = job_command


DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def job_scope() -> Iterator[None]:
    """Run one job's trainer; afterwards leave the process as a fresh job would find it: no
    process group, no rank variables, no open W&B run (the next job of a sweep starts its own)."""
    install_job_command()
    before = {key: os.environ.get(key) for key in DDP_ENV}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
