"""DDP child processes under Hydra.

Lightning starts ranks 1..N-1 by re-running the parent's command line. Under ``medsec <verb>``
that command line is not re-runnable as is, and in a multirun (``-m``) the children would start the
whole sweep again. We give Lightning a command that re-runs exactly this job: the verb, this job's
own overrides, its run directory, and ``hydra.mode=RUN``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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
