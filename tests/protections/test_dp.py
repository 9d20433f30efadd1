"""`protect=[dp]`: DP-SGD through the protection hooks, against Opacus' own accounting."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import UNet
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from medsec.errors import ConfigError
from medsec.models.classifiers import densenet121, resnet, small_cnn
from medsec.models.norms import batch_norm_modules, make_dp_compatible
from medsec.protections.dp import DifferentialPrivacy
from tests.conftest import TINY, medsec_cli, read_metrics, run_verb
from tests.contracts.test_tasks import RECIPES

DP_TINY = [*TINY, "protect=[dp]", "trainer.max_epochs=3", "test=false"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    run_verb("train", [*DP_TINY, "protect.dp.epsilon=3"], out)
    return out


def opacus_epsilon(examples: int, batch_size: int, epochs: int, target: float, delta: float,
                   accountant: str) -> tuple[float, float]:
    """Opacus on its own: make_private_with_epsilon on the same schedule, every step taken."""
    data = TensorDataset(torch.rand(examples, 3), torch.zeros(examples, dtype=torch.long))
    model = torch.nn.Linear(3, 2)
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=batch_size), target_epsilon=target, target_delta=delta,
        epochs=epochs, max_grad_norm=1.0)
    for _ in range(epochs):
        for features, labels in loader:
            torch.nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    return engine.get_epsilon(delta), optimizer.noise_multiplier


def test_epsilon_and_noise_equal_opacus_for_the_same_schedule(dp_run: Path) -> None:
    metrics = read_metrics(dp_run)
    # 192 training images, batch 32, 3 epochs, delta = 1/192: what Opacus' own engine computes
    expected_epsilon, expected_sigma = opacus_epsilon(192, 32, 3, 3.0, 1 / 192, "rdp")
    assert metrics["dp/noise_multiplier"] == pytest.approx(expected_sigma, rel=1e-6)
    assert metrics["dp/steps"] == 3 * 6 and metrics["dp/sample_rate"] == pytest.approx(32 / 192)
    assert metrics["dp/epsilon"] == pytest.approx(expected_epsilon, rel=1e-5)
    assert metrics["train/epsilon"] == metrics["dp/epsilon"] and 2.9 < metrics["dp/epsilon"] <= 3.0
    assert metrics["dp/delta"] == pytest.approx(1 / 192) and metrics["dp/max_grad_norm"] == 1.0
    history = RDPAccountant()
    history.history = [(metrics["dp/noise_multiplier"], 32 / 192, 18)]
    assert history.get_epsilon(1 / 192) == pytest.approx(metrics["dp/epsilon"], rel=1e-5)


@pytest.mark.slow
def test_prv_accountant_matches_opacus(tmp_path: Path) -> None:
    metrics = run_verb("train", [*DP_TINY, "trainer.max_epochs=2", "protect.dp.epsilon=5",
                                 "protect.dp.accountant=prv", "protect.dp.delta=1e-3"], tmp_path)
    expected_epsilon, expected_sigma = opacus_epsilon(192, 32, 2, 5.0, 1e-3, "prv")
    assert metrics["dp/noise_multiplier"] == pytest.approx(expected_sigma, rel=1e-6)
    assert metrics["dp/epsilon"] == pytest.approx(expected_epsilon, rel=1e-3)


def test_checkpoint_of_a_dp_run_is_rebuilt_with_group_norm(dp_run: Path, tmp_path: Path) -> None:
    """BatchNorm became GroupNorm during training; ``medsec eval`` rebuilds that network from the
    checkpoint (model.batch_norm=group stored) and reproduces the run's own test metrics."""
    state = torch.load(dp_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert state["hyper_parameters"]["model"]["batch_norm"] == "group"
    assert not any("running_mean" in key for key in state["state_dict"])
    first = run_verb("eval", [f"ckpt_path={dp_run}/checkpoints/best.ckpt"], tmp_path / "a")
    again = run_verb("eval", [f"ckpt_path={dp_run}/checkpoints/best.ckpt"], tmp_path / "b")
    assert first["test/auroc"] == again["test/auroc"] and 0 <= first["test/auroc"] <= 1


@pytest.mark.slow
def test_training_stops_at_its_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fixed sigma spends epsilon faster than planned: training stops before the step that would
    pass the budget, however many epochs were asked for (min_epochs included)."""
    metrics = run_verb("train", [*DP_TINY, "trainer.max_epochs=20", "trainer.min_epochs=20",
                                 "protect.dp.noise_multiplier=0.8", "protect.dp.epsilon=4"], tmp_path)
    assert metrics["dp/epsilon"] <= 4.0
    assert 6 <= metrics["dp/steps"] < 20 * 6
    history = RDPAccountant()
    history.history = [(0.8, 32 / 192, int(metrics["dp/steps"]) + 1)]
    assert history.get_epsilon(1 / 192) > 4.0  # one more step would have passed it
    assert "privacy budget: one more step would spend epsilon" in caplog.text


def one_dp_step(noise_multiplier: float, max_grad_norm: float) -> tuple[torch.Tensor, DifferentialPrivacy]:
    """One SGD step (lr 1) of a small CNN through the protection's model and optimiser hooks, on a
    batch of exactly the expected size; returns how far the weights moved."""
    torch.manual_seed(0)
    dp = DifferentialPrivacy(epsilon=None, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    holder = SimpleNamespace(net=small_cnn(3, 1, 2, 8), hparams=SimpleNamespace(model={}), per_sample_training=False)
    dp.configure_model(holder)
    holder.trainer = SimpleNamespace(datamodule=SimpleNamespace(datasets={"train": range(192)}, batch_size=32),
                                     world_size=1, max_epochs=1, limit_train_batches=None)
    params = [p for p in holder.net.parameters() if p.requires_grad]
    optimizer = dp.wrap_optimizers(torch.optim.SGD(params, lr=1.0), holder)["optimizer"]
    before = torch.cat([p.detach().flatten() for p in params])
    images, labels = torch.rand(32, 1, 16, 16), torch.randint(0, 3, (32,))
    torch.nn.functional.cross_entropy(holder.net(images), labels).backward()
    optimizer.step()
    assert holder.hparams.model["batch_norm"] == "group" and holder.per_sample_training
    return torch.cat([p.detach().flatten() for p in params]) - before, dp


def test_clipping_bounds_and_noise_dominates_the_update() -> None:
    """Without noise, 32 per-sample gradients clipped to C and averaged over the expected batch of
    32 move the weights by at most C; with sigma 1 the update is the noise, of norm about
    sigma * C * sqrt(parameters) / 32."""
    moved, dp = one_dp_step(0.0, 1e-3)
    assert 0 < moved.norm() <= 1e-3 * 1.0001
    moved, dp = one_dp_step(1.0, 1e-3)
    expected = 1.0 * 1e-3 * moved.numel() ** 0.5 / 32
    assert moved.norm() == pytest.approx(expected, rel=0.1)
    accountant = RDPAccountant()
    accountant.history = [(1.0, 32 / 192, 1)]
    assert dp.spent() == pytest.approx(accountant.get_epsilon(1 / 192))


NETWORKS = {
    "small_cnn": (lambda: small_cnn(2, 1, 2, 8), (4, 1, 16, 16)),
    "small_cnn_3d": (lambda: small_cnn(2, 1, 3, 4), (3, 1, 8, 8, 8)),
    "resnet18": (lambda: resnet(2, 1, 2, 18, small_input=True), (3, 1, 16, 16)),
    "densenet121": (lambda: densenet121(2, 1), (2, 1, 32, 32)),
    "unet3d": (lambda: UNet(3, 1, 3, (4, 8), (2,), num_res_units=1), (2, 1, 8, 8, 8)),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_become_dp_compatible(name: str) -> None:
    """BatchNorm replaced, in-place ops gone: per-sample gradients exist for every parameter, and
    without clipping or noise their mean is the ordinary batch gradient."""
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    net = make_dp_compatible(build())
    assert batch_norm_modules(net) == []
    GradSampleModule(net, loss_reduction="mean")
    images = torch.rand(shape)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1e9,
                            expected_batch_size=len(images))
    net(images).flatten(1).logsumexp(1).mean().backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == len(images) for p in params)
    batch_grads = [p.grad.clone() for p in params]
    optimizer.pre_step()
    for p, expected in zip(params, batch_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_segmentation_trains_with_dp(tmp_path: Path) -> None:
    metrics = run_verb("train", [*RECIPES["segmentation"], "data.num_workers=0", "protect=[dp]", "trainer.max_epochs=2",
                                 "protect.dp.epsilon=8", "callbacks.rich_progress_bar=null"], tmp_path)
    assert 0 < metrics["dp/epsilon"] <= 8.0 and "test/dice_mean" in metrics


def test_bad_dp_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="protect.dp.epsilon must be a positive number, got 0"):
        DifferentialPrivacy(epsilon=0)
    with pytest.raises(ConfigError, match="protect.dp.epsilon must be a positive number, got -1"):
        DifferentialPrivacy(epsilon=-1)
    with pytest.raises(ConfigError, match="protect.dp.delta must be in \\(0, 1\\)"):
        DifferentialPrivacy(delta=1.5)
    with pytest.raises(ConfigError, match="protect.dp.accountant must be one of \\['rdp', 'prv'\\]"):
        DifferentialPrivacy(accountant="gdp2")
    with pytest.raises(ConfigError, match="set epsilon .* or noise_multiplier"):
        DifferentialPrivacy(epsilon=None)
    with pytest.raises(ConfigError, match=r"BatchNorm layers \['backbone.1'"):
        run_verb("train", [*DP_TINY, "protect.dp.fix_model=false"], tmp_path / "bn")
    with pytest.raises(ConfigError, match="DenoisingTask has no per-sample loss"):
        run_verb("train", [*RECIPES["denoising"], "data.num_workers=0", "protect=[dp]"], tmp_path / "denoise")
    with pytest.raises(ConfigError, match="cannot be combined with \\['adversarial_training'\\]"):
        run_verb("train", [*DP_TINY, "protect=[dp,adversarial_training]"], tmp_path / "at")
    with pytest.raises(ConfigError, match="data.batch_size=500 exceeds the 192 training examples"):
        run_verb("train", [*DP_TINY, "data.batch_size=500"], tmp_path / "batch")


@pytest.mark.slow
def test_ddp_spends_the_same_epsilon_as_one_process(dp_run: Path, tmp_path: Path) -> None:
    """Two DDP processes (gloo) with the same global batch: same sample rate, steps and noise, so the
    same epsilon; each process samples its own shard (no injected distributed sampler)."""
    result = medsec_cli("train", *DP_TINY, "protect.dp.epsilon=3", "trainer=ddp_sim",
                        f"hydra.run.dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, single = read_metrics(tmp_path), read_metrics(dp_run)
    for key in ("dp/epsilon", "dp/noise_multiplier", "dp/sample_rate", "dp/steps"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
    assert json.loads((tmp_path / "metrics.json").read_text())["train/epsilon"] <= 3.0
