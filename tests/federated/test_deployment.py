"""`medsec federate federation=deployment`: Flower's deployment runtime on loopback (a SuperLink and
one SuperNode per site as separate processes, TLS, SuperNode authentication) finishes with the same
outputs as the simulation; SuperNodes that do not trust the SuperLink's CA or whose key is not
registered are refused; no process outlives the run."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medsec.errors import ConfigError
from medsec.federated.deployment import (
    flower_command,
    flower_environment,
    free_port,
    make_certificates,
    make_node_key,
    processes,
    run_on_loopback,
    supernode_command,
    wait_for_port,
)
from tests.conftest import run_verb
from tests.federated.test_federate import TINY_DATA, max_difference, weights

SITES = ["data.source.num_samples=[128,64,64]", "federation.num_sites=2", "federation.rounds=2"]
"""Two sites of 64 training images, two rounds."""


def flower_processes(directory: Path) -> list[int]:
    """Processes whose ``FLWR_HOME`` lies under ``directory`` (a deployment's SuperLink, SuperNodes
    and the app processes they start)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(item.startswith(b"FLWR_HOME=" + bytes(directory)) for item in environ):
                found.append(int(entry.name))
    return found


@pytest.fixture
def no_leaks(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``; afterwards, any Flower process started under it is killed (its process group)
    and the test fails."""
    yield tmp_path
    leftovers = flower_processes(tmp_path)
    for pid in leftovers:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            continue
    assert not leftovers, f"Flower processes outlived the deployment: {leftovers}"


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rounds.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def outputs(run_dir: Path) -> tuple[dict, list[dict[str, str]], dict]:
    return (json.loads((run_dir / "federated.json").read_text()), rows(run_dir),
            json.loads((run_dir / "metrics.json").read_text()))


@pytest.mark.slow
def test_deployment_and_simulation_agree_on_rounds_and_metrics(no_leaks: Path) -> None:
    deployed, simulated = no_leaks / "deployed", no_leaks / "simulated"
    run_verb("federate", [*TINY_DATA, *SITES, "federation=deployment"], deployed)
    run_verb("federate", [*TINY_DATA, *SITES, "federation.backend=inprocess"], simulated)
    (d_summary, d_rows, d_metrics), (s_summary, s_rows, s_metrics) = outputs(deployed), outputs(simulated)
    assert d_summary["backend"] == "deployment" and d_summary["rounds"] == s_summary["rounds"] == 2
    assert d_summary.keys() == s_summary.keys() and d_summary["final"].keys() == s_summary["final"].keys()
    assert d_summary["site_examples"] == s_summary["site_examples"] and not d_summary["failures"]
    assert [row["round"] for row in d_rows] == [row["round"] for row in s_rows] == ["0", "1", "2"]
    assert d_rows[0].keys() == s_rows[0].keys() and d_rows[-1]["sites_ok"] == "2"
    assert d_metrics.keys() == s_metrics.keys()
    for d_row, s_row in zip(d_rows, s_rows):  # same seeds, same code: the same numbers
        assert {k: pytest.approx(float(v), rel=1e-5) for k, v in d_row.items() if "/" in k and v} == \
            {k: float(v) for k, v in s_row.items() if "/" in k and v}
    assert {p.name for p in (deployed / "checkpoints").iterdir()} == {p.name for p in (simulated / "checkpoints").iterdir()}
    logs = deployed / "deployment" / "logs"
    assert "Uvicorn running on https://127.0.0.1" in (logs / "superlink.log").read_text()  # TLS
    assert "RegisterNode" in (logs / "superlink.log").read_text()  # the SuperNodes' keys
    assert {p.name for p in logs.iterdir()} == {"superlink.log", "supernode0.log", "supernode1.log"}


@pytest.mark.slow
def test_secagg_plus_over_the_deployment_runtime_aggregates_what_plain_fedavg_does(no_leaks: Path) -> None:
    """Three SuperNodes run SecAgg+'s key exchange and masking through the SuperLink; the server
    unmasks the sum, which is the in-process simulation's plain FedAvg aggregate."""
    common = [*TINY_DATA, "data.source.num_samples=[192,64,64]", "federation.num_sites=3", "federation.rounds=1",
              "federation.fraction_evaluate=0"]
    run_verb("federate", [*common, "federation.backend=inprocess"], no_leaks / "plain")
    result = run_verb("federate", [*common, "federation=deployment", "federation.secure_aggregation=secagg+",
                                   "federation.secagg.max_weight=100"], no_leaks / "secagg")
    assert result["backend"] == "deployment" and result["secure_aggregation"] == "secagg+"
    assert result["site_examples"] == {"0": 64, "1": 64, "2": 64} and not result["failures"]
    assert max_difference(weights(no_leaks / "plain" / "checkpoints" / "last.ckpt"),
                          weights(no_leaks / "secagg" / "checkpoints" / "last.ckpt")) < 1e-4


@pytest.mark.slow
def test_supernodes_without_the_ca_or_a_registered_key_are_refused(no_leaks: Path) -> None:
    good, other = make_certificates(no_leaks / "tls"), make_certificates(no_leaks / "other")
    assert "BEGIN CERTIFICATE" in good.ca.read_text() and good.key.stat().st_mode & 0o777 == 0o600
    port = free_port()
    with processes(no_leaks / "logs") as started:
        link = started.start("superlink", [
            flower_command("flower-superlink"), "--ssl-ca-certfile", str(good.ca), "--ssl-certfile", str(good.cert),
            "--ssl-keyfile", str(good.key), "--host", "127.0.0.1", "--port", str(port), "--enable-supernode-auth"],
            flower_environment(no_leaks / "superlink"))
        wait_for_port(port, link, 60, "flower-superlink")
        for name, ca in (("wrong_ca", other.ca), ("unregistered", good.ca)):
            key, _ = make_node_key(no_leaks / "keys", name)
            node = started.start(name, supernode_command(f"127.0.0.1:{port}", ca, key, 0, no_leaks / "x.yaml",
                                                         free_port()), flower_environment(no_leaks / name))
            try:
                assert node.wait(60) != 0, f"{name}: the SuperNode was not refused"
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: the SuperNode is still running after 60 s")
    assert "CERTIFICATE_VERIFY_FAILED" in (no_leaks / "logs" / "wrong_ca.log").read_text()
    assert "Failed to activate SuperNode" in (no_leaks / "logs" / "unregistered.log").read_text()
    assert "No SuperNode found with the given public key" in (no_leaks / "logs" / "superlink.log").read_text()


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.deployment.superlink=127.0.0.1:9093"], "federation.deployment.root_certificates"),
    (["protect=[dp]"], "DP-SGD accountant would restart every round"),
])
def test_settings_the_deployment_cannot_honour_are_refused(overrides: list[str], message: str,
                                                          no_leaks: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        run_verb("federate", [*TINY_DATA, *SITES, "federation=deployment", *overrides], no_leaks)
    assert not (no_leaks / "deployment" / "logs").exists()  # refused before anything started


@pytest.mark.slow
def test_a_failed_run_is_reported_and_stops_everything(no_leaks: Path) -> None:
    cfg = OmegaConf.create({"federation": {"num_sites": 1, "deployment": {"node_auth": True}}})
    with pytest.raises(RuntimeError, match="finished:failed.*missing.yaml. is not a medsec config file"):
        run_on_loopback(cfg, no_leaks / "deployment", no_leaks / "missing.yaml", 120)
