"""The `medsec` command as a user meets it: help, errors, the default run, sweeps, DDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsec import cli
from tests.conftest import TINY, medsec_cli, read_metrics


def test_help_lists_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "usage: medsec <verb>" in out


def test_unknown_verb_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    assert "unknown verb 'trian'" in capsys.readouterr().err


@pytest.mark.slow
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
def test_ddp_multirun_runs_each_job_once(tmp_path: Path) -> None:
    """DDP children re-enter Hydra for their own job only; the sweep is not started again."""
    result = medsec_cli("train", "-m", "trainer=ddp_sim", "seed=1,2", *TINY, "trainer.max_epochs=1",
                        f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweeps[0] / job / "train_rank1.log").is_file()  # a second process ran this job
        assert "test/auroc" in read_metrics(sweeps[0] / job)
    assert not (tmp_path / "train" / "runs").exists()


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
