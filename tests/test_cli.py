"""The `medsec` command as a user meets it: help, errors, the default run, sweeps (Hydra's and
submitit's launchers), DDP on one node and on two (torchrun), SLURM tasks as DDP ranks."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsec import cli
from tests.conftest import TINY, medsec_cli, read_metrics


def test_help_lists_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "usage: medsec <verb>" in out


def test_unknown_verb_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    assert "unknown verb 'trian'" in capsys.readouterr().err


HELP_PROBE = """
import contextlib, io, json, sys
from medsec.cli import VERBS, main
report = {}
for verb in VERBS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([verb, "--help"])
        except SystemExit as stop:
            code = stop.code
    loaded = [name for name in ("torch", "lightning", "monai", "torchvision", "flwr", "tenseal", "opacus",
                                "matplotlib") if name in sys.modules]
    report[verb] = {"code": code, "help": out.getvalue(), "loaded": loaded}
print(json.dumps(report))
"""


def test_every_verb_answers_help_without_the_heavy_stacks() -> None:
    """`medsec <verb> --help` composes the verb's config and prints Hydra's help without importing
    torch, Lightning, MONAI or a verb's own stacks (its module is imported only when a job runs)."""
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert list(report) == list(cli.VERBS)
    for verb, seen in report.items():
        assert seen["code"] == 0, verb
        assert seen["help"].startswith(f"`medsec {verb} [group=option ...]"), (verb, seen["help"][:200])
        assert "== Config ==" in seen["help"], verb
        assert seen["loaded"] == [], verb


def test_train_help_is_hydra_help() -> None:
    result = medsec_cli("train", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "== Configuration groups ==" in result.stdout
    groups = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert {"chestxray14", "decathlon", "folder", "medmnist", "synthetic"} <= set(groups["data"].split(", "))
    assert {"cpu", "gpu", "ddp", "ddp_sim"} <= set(groups["trainer"].split(", "))
    assert {"aes"} <= set(groups["crypto"].split(", ")) and "pgd_at" in groups["defense"]


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = medsec_cli("train", "data=medmnist", f"data.source.root={missing}", "data.source.download=false",
                        f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert f"{missing}/pneumoniamnist.npz" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_eval_requires_a_checkpoint(tmp_path: Path) -> None:
    result = medsec_cli("eval", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert "ckpt_path" in result.stderr


@pytest.mark.slow
def test_default_train_learns(tmp_path: Path) -> None:
    """`medsec train` with no overrides: synthetic data, no download, clearly above chance."""
    result = medsec_cli("train", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["test/auroc"] > 0.95
    assert metrics["test/acc"] > 0.8
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_ddp_multirun_runs_each_job_once(tmp_path: Path, launcher: str) -> None:
    """DDP children re-enter Hydra for their own job only; the sweep is not started again. With
    Hydra's own launcher the jobs run one after the other in this process; with submitit's, each in
    a process of its own (as on a cluster with `submitit_slurm`), side by side."""
    result = medsec_cli("train", "-m", f"hydra/launcher={launcher}", "trainer=ddp_sim", "seed=1,2", *TINY,
                        "trainer.max_epochs=1", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    assert (sweeps[0] / ".submitit").is_dir() == (launcher == "submitit_local")  # submitit's job files
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and p.name != ".submitit")
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweeps[0] / job / "train_rank1.log").is_file()  # a second process ran this job
        assert "test/auroc" in read_metrics(sweeps[0] / job)
    assert not (tmp_path / "train" / "runs").exists()


@pytest.mark.slow
def test_submitit_slurm_sweep_runs_each_ddp_rank_as_a_slurm_task(tmp_path: Path) -> None:
    """`hydra/launcher=submitit_slurm` against SLURM played on this machine (`tests/fake_slurm.py`):
    each job of the sweep is an array task whose two SLURM tasks are its two DDP ranks, which
    Lightning's SLURM environment reads (it starts no process of its own)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "sacct"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name("fake_slurm.py")} '
                                    f'{name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    result = medsec_cli("train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2",
                        "trainer=ddp_sim", "seed=1,2", *TINY, "trainer.max_epochs=1", f"paths.log_dir={tmp_path}",
                        cwd=tmp_path, env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert "test/auroc" in read_metrics(sweep / job)
        assert not (sweep / job / "train_rank1.log").exists()  # no rank started by Lightning
        for rank in (0, 1):
            (log,) = (sweep / ".submitit").glob(f"*_{job}/*_{job}_{rank}_log.err")
            assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log.read_text()


def torchrun_train(run_dir: Path, nnodes: int, nproc: int, *overrides: str) -> list[str]:
    """`medsec train OVERRIDES` under ``nnodes`` `torchrun` agents of ``nproc`` processes each, all on
    this machine (c10d rendezvous on loopback) and writing to ``run_dir``; returns each agent's output."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("torchrun")), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_dir.name}",
               "-m", "medsec", "train", *overrides, f"hydra.run.dir={run_dir}"]
    logs = [run_dir.with_name(f"{run_dir.name}_agent{k}.txt") for k in range(nnodes)]
    agents = [subprocess.Popen(command, cwd=run_dir.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)
              for log in logs]
    for agent, log in zip(agents, logs):
        assert agent.wait(timeout=600) == 0, log.read_text()[-3000:]
    return [log.read_text() for log in logs]


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_one_node_with_two_processes(tmp_path: Path) -> None:
    """Multi-node DDP: two `torchrun` agents of one process each (two "nodes" on this machine, gloo)
    train to the same weights as one agent with two processes."""
    common = ["trainer=ddp_sim", *TINY]
    torchrun_train(tmp_path / "one_node", 1, 2, *common)
    outputs = torchrun_train(tmp_path / "two_nodes", 2, 1, *common, "trainer.devices=1", "trainer.num_nodes=2")
    ranks = [re.findall(r"GLOBAL_RANK: (\d), MEMBER: \d/2", output) for output in outputs]
    assert sorted(found[0] for found in ranks) == ["0", "1"]  # each agent ran one rank of a world of two
    one, two = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                for run in ("one_node", "two_nodes"))
    assert one.keys() == two.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-6, msg=key)
    scores = [{key: value for key, value in read_metrics(tmp_path / run).items() if key.startswith(("val/", "test/"))}
              for run in ("one_node", "two_nodes")]
    assert "test/auroc" in scores[0] and scores[1] == pytest.approx(scores[0], abs=1e-6)


@pytest.mark.slow
def test_optuna_sweep_returns_the_monitored_metric(tmp_path: Path) -> None:
    result = medsec_cli("train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY,
                        "trainer.max_epochs=1", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    summary = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in summary
    best = max(json.loads((job / "metrics.json").read_text())["val/auroc_best"] for job in sweep.iterdir()
               if (job / "metrics.json").exists())
    assert f"best_value: {best}"[:18] in summary


@pytest.mark.slow
@pytest.mark.parametrize("loading", [["data.cache=true"], ["data.cache=false", "data.num_workers=2"]],
                         ids=["cached", "in-workers"])
def test_truncated_image_is_named(tmp_path: Path, loading: list[str]) -> None:
    """A broken file is reported by name, whether read while caching or inside a DataLoader worker."""
    from tests.data.fakes import write_png

    for cls in ("a", "b"):
        for i in range(4):
            write_png(tmp_path / "images" / cls / f"{i}.png")
    broken = tmp_path / "images" / "b" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])
    result = medsec_cli("train", "data=folder", f"data.source.root={tmp_path / 'images'}", "data.batch_size=2",
                        "trainer.max_epochs=1", *loading, f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert f"error: cannot read image file {broken}" in output
    assert "Traceback" not in output
