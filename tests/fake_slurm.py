"""SLURM's `sbatch`, `srun` and `sacct` played on one machine, just enough for submitit to submit a job
array and for Lightning's SLURM environment to find its ranks: ``python fake_slurm.py sbatch|srun|sacct
ARGS`` (the tests put one-line wrappers of those names on ``PATH``).

`sbatch` answers at once, as SLURM does, and runs the array's tasks one after the other in the
background; `srun` starts ``--ntasks-per-node`` x ``--nodes`` copies of its command with the rank
variables SLURM sets; `sacct` knows no job, so submitit waits for each job's result file.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def sbatch(script: Path) -> None:
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script.read_text(), re.MULTILINE))
    last = int(flags.get("array", "0-0").split("%")[0].split("-")[1])
    array_id = 1000 + os.getpid() % 8000  # Lightning derives its port from the last 4 digits of a job id
    nodes, per_node = flags.get("nodes", "1"), flags.get("ntasks-per-node", "1")
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": str(array_id), "SLURM_JOB_NAME": flags.get("job-name", "job"),
           "SLURM_JOB_NUM_NODES": nodes, "SLURM_NNODES": nodes, "SLURM_NTASKS_PER_NODE": per_node,
           "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NODELIST": "127.0.0.1"}
    runner = f"sleep 2; for i in $(seq 0 {last}); do SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=$(({array_id} + 1 + $i)) " \
             f"bash {script}; done"  # the pause: submitit moves the jobs' files in place once sbatch answers
    subprocess.Popen(["bash", "-c", runner], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {array_id}")


def log_file(pattern: str, rank: int) -> Path:
    """``pattern`` with SLURM's ``%A``, ``%a``, ``%j`` (as submitit names an array's task) and ``%t``."""
    array, task = os.environ["SLURM_ARRAY_JOB_ID"], os.environ["SLURM_ARRAY_TASK_ID"]
    path = Path(pattern.replace("%j", f"{array}_{task}").replace("%A", array).replace("%a", task)
                .replace("%t", str(rank)))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def srun(args: list[str]) -> int:
    files: dict[str, str] = {}
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = args.pop(0)
    per_node, nodes = int(os.environ["SLURM_NTASKS_PER_NODE"]), int(os.environ["SLURM_JOB_NUM_NODES"])
    tasks = []
    for rank in range(per_node * nodes):
        out, err = (log_file(files[flag], rank) for flag in ("--output", "--error"))
        env = {**os.environ, "SLURM_NTASKS": str(per_node * nodes), "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node)}
        tasks.append(subprocess.Popen(args, env=env, stdout=out.open("a"), stderr=err.open("a")))
    return max(task.wait() for task in tasks)


def main() -> int:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(Path(args[-1]))
    elif command == "srun":
        return srun(args)
    elif command == "sacct":
        print("JobID|State|NodeList")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
