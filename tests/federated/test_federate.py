"""`medsec federate`: Flower's real ServerApp/ClientApp message flow (in-process simulation backend)
over tiny synthetic sites: what a run writes, that its checkpoints are ordinary medsec checkpoints,
equivalence with centralised training, robustness to poisoned and malformed updates, resuming,
SecAgg+ and client-level DP."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters
from opacus.accountants import RDPAccountant

from medsec.core.checkpoint import read_checkpoint
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.federated.client import ProximalTerm
from medsec.federated.federation import check
from medsec.federated.privacy import client_level_epsilon
from medsec.federated.server import FederatedStrategy, base_strategy, build_strategy, he_aggregation
from medsec.federated.sites import QUIET_TRAINER, trainer
from medsec.federated.weights import Layout
from medsec.utils.config import compose_config
from tests.conftest import medsec_cli, read_metrics, run_verb

TINY_DATA = ["data.source.image_size=24", "data.num_workers=0", "data.batch_size=32", "model.net.width=8"]
FED_TINY = [*TINY_DATA, "data.source.num_samples=[192,64,64]", "federation.backend=inprocess"]
"""Three sites of 64 training images (24 px), a CNN of width 8; sites run in-process, one at a time."""


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rounds.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "federated.json").read_text())


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(checkpoint)["state_dict"].items() if v.is_floating_point()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three IID sites, two rounds of one local epoch, FedAvg; round metrics also to the CSV logger."""
    out = tmp_path_factory.mktemp("federate")
    run_verb("federate", [*FED_TINY, "federation.rounds=2", "logger=csv"], out)
    return out


# ---- configs refused before anything runs ------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.num_sites=2", "federation.secure_aggregation=secagg+"], "at least 3 sites"),
    (["federation.strategy=median", "federation.secure_aggregation=secagg+"], "needs every site's update"),
    (["federation.secure_aggregation=rsa"], "federation.secure_aggregation must be"),
    (["federation.secure_aggregation=paillier"], "federation.paillier.site_key"),
    (["federation.secure_aggregation=paillier", "federation.strategy=fedadam"],
     "secure_aggregation=paillier: the server only adds ciphertexts"),
    (["federation.secure_aggregation=ckks"], "federation.ckks.site_context"),
    (["federation.secure_aggregation=ckks", "federation.strategy=fedadam"], "cannot run FedAdam's optimiser"),
    (["federation.min_sites=4"], "federation.min_sites"),
    (["federation.rounds=0"], "federation.rounds"),
    (["federation.hostile=[{site:5,kind:scale}]"], "federation.hostile"),
    (["federation.strategy=fedprox", "protect=[dp]"], "fedprox with protect"),
    (["federation.client_dp={noise_multiplier:1.0,clipping_norm:0,delta:1e-5}"], "clipping_norm"),
])
def test_settings_the_federation_cannot_honour_are_refused(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        check(compose_config("federate", [*FED_TINY, *overrides], tmp_path))


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.strategy=fedsgd"], "federation.strategy must be one of"),
    (["federation.strategy=trimmed_mean"], "beta=0.2 trims nothing from 3 sites"),
    (["federation.strategy=krum", "+federation.strategy_options.beta=0.3"], "federation.strategy_options"),
])
def test_strategy_settings_are_checked(overrides: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_config("federate", [*FED_TINY, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        build_strategy(cfg.federation, 3, None)


def test_layout_names_what_is_wrong_with_an_update() -> None:
    task = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layout = Layout.of(task)
    good = [v.numpy().copy() for v in task.state_dict().values() if v.is_floating_point()]
    assert "num_batches_tracked" not in " ".join(layout.keys) and layout.problem(good) is None
    assert "NaN" in layout.problem([np.full_like(good[0], np.nan), *good[1:]])
    assert "shape (6,)" in layout.problem([good[0].ravel(), *good[1:]])
    assert "float64" in layout.problem([good[0].astype(np.float64), *good[1:]])
    assert f"expected {len(good)}" in layout.problem(good[:-1])


def test_proximal_term_adds_the_gradient_of_mu_half_squared_distance() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    term = ProximalTerm(0.5, module)
    with torch.no_grad():
        module.weight.add_(1.0)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    term.on_before_optimizer_step(None, module, None)
    anchor = term.anchor["weight"].requires_grad_(True)
    w = module.weight.detach().clone().requires_grad_(True)
    (0.5 / 2 * (w - anchor).pow(2).sum()).backward()
    assert torch.allclose(module.weight.grad, w.grad) and torch.allclose(module.weight.grad, torch.full_like(w, 0.5))


@pytest.mark.parametrize(("rate", "sigma", "rounds"), [(1.0, 1.0, 3), (0.4, 1.1, 50), (0.1, 0.8, 200)])
def test_client_level_epsilon_is_opacus_rdp(rate: float, sigma: float, rounds: int) -> None:
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, rounds)]
    assert client_level_epsilon(rate, sigma, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


# ---- a federation ------------------------------------------------------------------------------
def test_a_federation_writes_its_rounds_summary_and_checkpoints(fed_run: Path) -> None:
    table, result = rows(fed_run), summary(fed_run)
    assert [row["round"] for row in table] == ["0", "1", "2"]  # round 0: the initial model
    for row in table[1:]:
        assert float(row["seconds"]) > 0 and int(row["bytes_sent"]) > 0 and int(row["bytes_received"]) > 0
        assert row["sites_ok"] == "3" and {f"site{i}/train_loss" for i in range(3)} <= row.keys()
        assert {"val/loss", "val/auroc", "test/auroc", "site0/val_loss"} <= row.keys()
    assert result["rounds"] == 2 and result["num_sites"] == 3 and result["strategy"] == "fedavg"
    assert result["site_examples"] == {"0": 64, "1": 64, "2": 64} and not result["refused"]
    assert result["final"]["test/auroc"] == pytest.approx(float(table[-1]["test/auroc"]))
    assert {p.name for p in (fed_run / "checkpoints").iterdir()} == {"round_001.ckpt", "round_002.ckpt", "last.ckpt",
                                                                     "best.ckpt"}
    best = max(table[1:], key=lambda row: float(row["val/auroc"]))  # the first of equals: strictly better only
    assert result["monitor"] == "val/auroc" and result["best"]["round"] == int(best["round"])
    assert result["best"]["test/auroc"] == pytest.approx(float(best["test/auroc"]))
    assert read_checkpoint(fed_run / "checkpoints" / "best.ckpt")["federation"]["round"] == int(best["round"])
    assert read_metrics(fed_run)["test/auroc"] == result["final"]["test/auroc"]
    assert float(table[-1]["val/loss"]) < float(table[0]["val/loss"])  # it learns


def test_every_round_reaches_the_configured_logger_once(fed_run: Path) -> None:
    with open(fed_run / "csv" / "metrics.csv", newline="") as handle:
        logged = list(csv.DictReader(handle))
    table = rows(fed_run)
    assert [int(row["step"]) for row in logged] == [0, 1, 2]
    for sent, row in zip(logged, table, strict=True):
        assert float(sent["test/auroc"]) == pytest.approx(float(row["test/auroc"]))
        assert float(sent["round/bytes_sent"]) == float(row["bytes_sent"])
    assert float(logged[2]["site1/val_loss"]) == pytest.approx(float(table[2]["site1/val_loss"]))
    assert "federation" in (fed_run / "csv" / "hparams.yaml").read_text()


def test_the_round_checkpoint_is_an_ordinary_medsec_checkpoint(fed_run: Path, tmp_path: Path) -> None:
    metrics = run_verb("eval", [f"ckpt_path={fed_run / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    assert metrics["test/auroc"] == pytest.approx(summary(fed_run)["final"]["test/auroc"], abs=1e-6)


@pytest.mark.slow
def test_resuming_from_a_round_checkpoint_continues_at_the_next_round(fed_run: Path, tmp_path: Path) -> None:
    shutil.copytree(fed_run / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    (tmp_path / "checkpoints" / "round_002.ckpt").unlink()
    shutil.copy(tmp_path / "checkpoints" / "round_001.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    result = run_verb("federate", [*FED_TINY, "federation.rounds=2", "federation.resume=true"], tmp_path)
    assert [row["round"] for row in rows(tmp_path)] == ["0", "1", "2"] and result["rounds"] == 2
    assert result["best"]["round"] == summary(fed_run)["best"]["round"]  # the best round survives the restart
    assert max_difference(weights(tmp_path / "checkpoints" / "round_002.ckpt"),
                          weights(fed_run / "checkpoints" / "round_002.ckpt")) < 1e-5


@pytest.mark.slow
def test_one_site_with_all_the_data_is_centralised_training(tmp_path: Path) -> None:
    """FedAvg over one site holding every record, one round of 3 local epochs = 3 epochs of
    centralised training from the same initial weights and the same seed (CPU, one thread)."""
    data = [*TINY_DATA, "data.source.num_samples=[96,32,32]"]
    run_verb("federate", [*data, "federation.backend=inprocess", "federation.num_sites=1", "federation.rounds=1",
                          "federation.local_epochs=3", "federation.fraction_evaluate=0"], tmp_path / "fed")
    cfg = compose_config("train", [*data, "trainer.max_epochs=3", "logger=none", "callbacks=none"],
                         tmp_path / "central")
    run = Run.build(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    trainer(run, [], limit_val_batches=0, **QUIET_TRAINER).fit(run.task, datamodule=run.datamodule)
    central = {k: v for k, v in run.task.state_dict().items() if v.is_floating_point()}
    # measured: 0.0 (training moved the weights by up to 0.64; another shuffling seed ends 0.13 away)
    assert max_difference(weights(tmp_path / "fed" / "checkpoints" / "round_001.ckpt"), central) < 1e-5


# ---- hostile sites --------------------------------------------------------------------------------
@pytest.mark.slow
def test_malformed_updates_are_refused_and_named_and_the_round_goes_on(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    hostile = ("[{site:1,kind:non_finite},{site:2,kind:wrong_shape},{site:3,kind:wrong_round},{site:4,kind:crash},"
               "{site:5,kind:wrong_count}]")
    with caplog.at_level(logging.WARNING, logger="medsec.federated"):
        result = run_verb("federate", [*TINY_DATA, "data.source.num_samples=[192,48,64]", "federation.num_sites=6",
                                       "federation.backend=inprocess", "federation.rounds=1",
                                       "federation.fraction_evaluate=0",
                                       f"federation.hostile={hostile}"], tmp_path)
    refused = {entry["site"]: entry["reason"] for entry in result["refused"]}
    assert set(refused) == {1, 2, 3, 5} and "NaN" in refused[1] and "shape" in refused[2] and "round 0" in refused[3]
    assert "arrays, expected" in refused[5]
    assert len(result["failures"]) == 1 and "simulated crash" in result["failures"][0]["reason"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(f"refused the update of site {s} (node " in logged for s in (1, 2, 3, 5))
    assert "a site failed" in logged and "replied with an error" in logged
    row = rows(tmp_path)[-1]
    assert (row["sites_ok"], row["sites_refused"], row["sites_failed"]) == ("1", "4", "1")
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "checkpoints" / "last.ckpt").values())


@pytest.mark.slow
def test_a_poisoning_site_breaks_fedavg_but_not_the_robust_strategies(tmp_path: Path) -> None:
    """Site 2 of 3 sends its update scaled x100 every round; three rounds of three local epochs."""
    poison = "federation.hostile=[{site:2,kind:scale,factor:100}]"
    runs = {"fedavg, no poisoning": ["federation.strategy=fedavg"], "fedavg": ["federation.strategy=fedavg", poison],
            "median": ["federation.strategy=median", poison],
            "trimmed_mean": ["federation.strategy=trimmed_mean", "+federation.strategy_options.beta=0.34", poison],
            "krum": ["federation.strategy=krum", "+federation.strategy_options.num_malicious_clients=1", poison]}
    auroc = {}
    for name, overrides in runs.items():
        result = run_verb("federate", [*FED_TINY, "federation.rounds=3", "federation.local_epochs=3",
                                       "federation.fraction_evaluate=0", *overrides], tmp_path / name.replace(", ", "_"))
        auroc[name] = result["final"]["test/auroc"]
        assert not result["refused"], result["refused"]  # well-formed updates: the checks let them through
    print("test AUROC, site 2 poisoning x100:", auroc)
    # measured: 0.77 without poisoning; poisoned: FedAvg 0.50, median and trimmed mean 0.81, Krum 0.79
    assert auroc["fedavg"] < 0.6 and auroc["fedavg, no poisoning"] > 0.7, auroc
    assert all(auroc[s] > auroc["fedavg, no poisoning"] - 0.05 for s in ("median", "trimmed_mean", "krum")), auroc


# ---- secure aggregation, privacy ----------------------------------------------------------------
@pytest.mark.slow
def test_secagg_plus_aggregates_what_plain_fedavg_does(tmp_path: Path) -> None:
    common = [*FED_TINY, "federation.rounds=1", "federation.fraction_evaluate=0"]
    run_verb("federate", common, tmp_path / "plain")
    # max_weight just above the sites' 64 examples: the weighted update is quantised on a finer grid
    result = run_verb("federate", [*common, "federation.secure_aggregation=secagg+",
                                       "federation.secagg.max_weight=100"], tmp_path / "secagg")
    assert result["secure_aggregation"] == "secagg+"
    difference = max_difference(weights(tmp_path / "plain" / "checkpoints" / "last.ckpt"),
                                weights(tmp_path / "secagg" / "checkpoints" / "last.ckpt"))
    print("SecAgg+ vs plain FedAvg, largest weight difference:", difference)
    assert difference < 1e-4  # measured 4.6e-6 (stochastic quantisation to 2^22 levels over [-8, 8])


@pytest.mark.slow
def test_client_dp_reports_the_opacus_epsilon_of_its_rounds(tmp_path: Path) -> None:
    result = run_verb("federate", [*FED_TINY, "model.batch_norm=group", "federation.rounds=2",
                                   "federation.fraction_evaluate=0",
                                   "federation.client_dp={noise_multiplier:1.2,clipping_norm:2.0,delta:1e-5}"], tmp_path)
    accountant = RDPAccountant()
    accountant.history = [(1.2, 1.0, 2)]  # every site every round: q = 1
    assert result["client_dp"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert result["client_dp"]["sample_rate"] == 1.0 and result["rounds"] == 2


@pytest.mark.slow
def test_client_dp_refuses_batch_norm_statistics(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.batch_norm=group"):
        run_verb("federate", [*FED_TINY, "federation.client_dp={noise_multiplier:1.0,clipping_norm:1.0,delta:1e-5}"],
                 tmp_path)


@pytest.mark.slow
def test_dp_sgd_inside_the_sites_keeps_working(tmp_path: Path) -> None:
    """Each site's DP-SGD budget covers all rounds: its accountant carries over, round 1 spends part
    of epsilon 5 and the last round spends (almost) all of it, never more."""
    run_verb("federate", [*FED_TINY, "protect=[dp]", "protect.dp.epsilon=5", "federation.rounds=2",
                          "federation.fraction_evaluate=0"], tmp_path)
    first, last = rows(tmp_path)[-2], rows(tmp_path)[-1]
    for i in range(3):
        assert 0 < float(first[f"site{i}/dp_epsilon"]) < float(last[f"site{i}/dp_epsilon"]) <= 5, (first, last)
        assert float(last[f"site{i}/dp_epsilon"]) > 4.5
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]["batch_norm"] == "group"


def test_ckks_without_its_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import medsec.federated

    monkeypatch.delattr(medsec.federated, "he_aggregation", raising=False)
    monkeypatch.setitem(sys.modules, "medsec.federated.he_aggregation", None)
    with pytest.raises(ConfigError, match="secure_aggregation=ckks needs"):
        he_aggregation()


def test_ckks_aggregation_plugs_in(tmp_path: Path) -> None:
    """The hook of `secure_aggregation=ckks` (medsec.federated.he_aggregation): the server only holds
    ciphertexts (no evaluation, no checkpoint); the sites decrypt and evaluate the global model."""
    ckks = pytest.importorskip("medsec.federated.he_aggregation")
    site_context = ckks.make_site_context(tmp_path / "keys" / "site.ctx")
    (tmp_path / "keys" / "server.ctx").write_bytes(ckks.public_context(site_context))
    result = run_verb("federate", [*FED_TINY, "federation.rounds=1", "federation.secure_aggregation=ckks",
                                   f"federation.ckks.site_context={tmp_path / 'keys' / 'site.ctx'}",
                                   f"federation.ckks.public_context={tmp_path / 'keys' / 'server.ctx'}"],
                      tmp_path / "run")
    row = rows(tmp_path / "run")[-1]
    assert result["secure_aggregation"] == "ckks" and row["sites_ok"] == "3" and not result["refused"]
    assert all(np.isfinite(float(row[f"site{i}/val_loss"])) for i in range(3))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_ray_backend_runs_a_federation(tmp_path: Path) -> None:
    """Flower's own Ray backend: two sites in Ray worker processes, one CPU each."""
    result = run_verb("federate", [*TINY_DATA, "data.source.num_samples=[192,64,64]", "federation.backend=ray",
                                   "federation.num_sites=2", "federation.rounds=1", "federation.fraction_evaluate=0"],
                      tmp_path)
    assert result["rounds"] == 1 and result["site_examples"] == {"0": 96, "1": 96} and not result["failures"]
    assert (tmp_path / "checkpoints" / "round_001.ckpt").is_file()


@pytest.mark.slow
def test_sites_with_their_own_data_and_keys(tmp_path: Path) -> None:
    """Site 0 trains from its own AES store, with a key file only its config names; site 1 from its
    own plain data; the server evaluates on `data`."""
    key, stores = tmp_path / "keys" / "site0.key", tmp_path / "stores"
    refs = [f"crypto.key.file={key}", f"paths.store_dir={stores}"]
    run_verb("encrypt", ["action=keygen", *refs], tmp_path / "keygen")
    run_verb("encrypt", ["data.source.image_size=24", "data.source.seed=1", "data.source.num_samples=[64,16,16]", *refs],
             tmp_path / "encrypt")
    aes = f"{{_target_:medsec.protections.AESStage,key:{{source:file,file:'{key}'}},store_root:'{stores}'}}"
    sites = (f"[{{data:{{source:{{seed:1,num_samples:[64,16,16]}}}},protect:{{aes:{aes}}}}},"
             "{data:{source:{seed:2,num_samples:[96,16,16]}}}]")
    result = run_verb("federate", [*FED_TINY, "federation.rounds=1", f"federation.sites={sites}"], tmp_path / "run")
    assert result["num_sites"] == 2 and result["site_examples"] == {"0": 64, "1": 96} and result["partition"] is None
    configs = [(tmp_path / "run" / "sites" / f"site{i}" / "config.yaml").read_text() for i in range(2)]
    assert str(key) in configs[0] and str(key) not in configs[1]
    assert rows(tmp_path / "run")[-1]["sites_ok"] == "2"


@pytest.mark.slow
def test_the_command_line_names_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    result = medsec_cli("federate", "federation.num_sites=2", "federation.secure_aggregation=secagg+",
                        f"hydra.run.dir={tmp_path}", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "secagg+ needs at least 3 sites" in output and "Traceback" not in output


@pytest.mark.slow
def test_fedadam_state_travels_in_the_round_checkpoint(tmp_path: Path) -> None:
    """FedAdam's server state (moments, current weights) is saved with each round and put back on
    resume. (Comparing resumed and straight weights is no test here: with tau = 1e-9 FedAdam's step is
    about eta * sign(update), so float noise in near-zero updates moves weights by eta; measured in
    one process, resumed = straight to 0.0, and 0.0084 apart when the state is not put back.)"""
    run_verb("federate", [*FED_TINY, "federation.strategy=fedadam", "federation.rounds=1",
                          "federation.fraction_evaluate=0"], tmp_path)
    saved = read_checkpoint(tmp_path / "checkpoints" / "round_001.ckpt")["federation"]["server_state"]
    cfg = compose_config("federate", [*FED_TINY, "federation.strategy=fedadam"], tmp_path / "again")
    initial = [np.zeros(t.shape, np.float32) for t in saved["current_weights"]]
    strategy = FederatedStrategy(build_strategy(cfg.federation, 3, ndarrays_to_parameters(initial)), None, "fedadam", 2)
    strategy.restore(saved)
    assert set(saved) == {"current_weights", "m_t", "v_t"} and len(saved["m_t"]) == len(initial)
    assert all(np.array_equal(a, t.numpy()) for name in saved for a, t in
               zip(getattr(base_strategy(strategy.strategy), name), saved[name]))


@pytest.mark.slow
def test_fedprox_keeps_the_sites_near_the_global_model(tmp_path: Path) -> None:
    """The proximal term reaches the sites' training: one round moves the parameters less."""
    initial = Run.build(compose_config("train", [*TINY_DATA, "data.source.num_samples=[192,64,64]", "logger=none",
                                                 "callbacks=none"], tmp_path / "initial")).task.state_dict()
    initial = {k: v for k, v in initial.items() if v.is_floating_point() and "running_" not in k}  # parameters
    moved = {}
    for strategy in ("fedavg", "fedprox"):
        run_verb("federate", [*FED_TINY, f"federation.strategy={strategy}", "federation.proximal_mu=10",
                              "federation.rounds=1", "federation.local_epochs=2", "federation.fraction_evaluate=0"],
                 tmp_path / strategy)
        final = weights(tmp_path / strategy / "checkpoints" / "last.ckpt")
        moved[strategy] = float(torch.sqrt(sum(((final[k] - v) ** 2).sum() for k, v in initial.items())))
    print("distance of the parameters from the initial ones after a round:", moved)
    assert moved["fedprox"] < 0.5 * moved["fedavg"], moved  # measured: 0.086 (mu = 10) against 0.317


@pytest.mark.slow
def test_secagg_plus_survives_a_site_that_drops_out(tmp_path: Path) -> None:
    """Site 2 of 4 crashes after the key exchange: SecAgg+ removes its masks with the other sites'
    shares and the aggregate is plain FedAvg over the three that answered."""
    common = [*TINY_DATA, "data.source.num_samples=[192,64,64]", "federation.backend=inprocess", "federation.num_sites=4",
              "federation.rounds=1", "federation.fraction_evaluate=0", "federation.hostile=[{site:2,kind:crash}]"]
    run_verb("federate", common, tmp_path / "plain")
    result = run_verb("federate", [*common, "federation.secure_aggregation=secagg+", "federation.secagg.max_weight=100"],
                      tmp_path / "secagg")
    row = rows(tmp_path / "secagg")[-1]
    assert row["sites_ok"] == "3" and row["sites_failed"] == "1" and len(result["failures"]) == 1
    assert max_difference(weights(tmp_path / "plain" / "checkpoints" / "last.ckpt"),
                          weights(tmp_path / "secagg" / "checkpoints" / "last.ckpt")) < 1e-4
