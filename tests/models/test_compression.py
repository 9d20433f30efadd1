"""The learned codec (CompressAI mean-scale hyperprior) and task=compression: shapes, bit strings,
checkpoints read with ``weights_only=True`` and rebuilt coder tables, the rate-distortion loss, and
training through ``medsec train``."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medsec.data.datamodule import build_datamodule
from medsec.data.transforms import random_patches
from medsec.tasks.compression import CompressionTask, rate_distortion
from medsec.utils.config import compose_config
from tests.conftest import read_metrics, run_verb

codec = pytest.importorskip("medsec.models.codec", reason="CompressAI is not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: no thread pool


def tiny(seed: int = 0, **kwargs: int) -> codec.HyperpriorCodec:
    torch.manual_seed(seed)
    return codec.HyperpriorCodec(**{"N": 8, "M": 12, **kwargs})


def test_any_image_size_codes_and_decodes_to_its_shape() -> None:
    model = tiny().eval()
    for size in ((36, 44), (64, 64), (70, 129)):
        image = torch.rand(1, *size)
        y_string, z_string = model.compress_image(image)
        assert y_string and z_string
        decoded = model.decompress_image(y_string, z_string, size)
        assert decoded.shape == (1, *size) and 0 <= decoded.min() and decoded.max() <= 1
        out = model.forward_padded(image[None])
        assert out["x_hat"].shape == (1, 1, *size) and set(out["likelihoods"]) == {"y", "z"}


def test_rgb_and_bad_settings() -> None:
    assert tiny(in_channels=3).eval().compress_image(torch.rand(3, 64, 64))[0]
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        codec.HyperpriorCodec(in_channels=2)
    with pytest.raises(ValueError, match="N and M must be positive"):
        codec.HyperpriorCodec(N=0)


def test_checkpoint_holds_no_coder_tables_and_loads_with_weights_only() -> None:
    trained = tiny(seed=0).eval()
    with torch.no_grad():
        trained.entropy_bottleneck.quantiles.mul_(1.5)  # other quantiles: other tables
    trained.update(force=True)
    state = trained.state_dict()
    assert not [name for name in state if name.rsplit(".", 1)[-1] in codec.DERIVED_BUFFERS]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = tiny(seed=1)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))  # rebuilds the tables from the weights
    loaded.eval()
    for name in ("entropy_bottleneck", "gaussian_conditional"):
        for table in ("_quantized_cdf", "_offset", "_cdf_length"):
            assert torch.equal(getattr(getattr(loaded, name), table), getattr(getattr(trained, name), table))
    image = torch.rand(1, 40, 40)
    assert loaded.compress_image(image) == trained.compress_image(image)


def test_diverged_quantiles_are_refused() -> None:
    model = tiny()
    with torch.no_grad():
        model.entropy_bottleneck.quantiles[:, :, 2] = 1e5
    with pytest.raises(ValueError, match="quantiles span .* symbols, more than 4096"):
        model.update(force=True)


def test_rate_distortion_loss_and_patches() -> None:
    target = torch.rand(2, 1, 8, 8)
    likelihoods = {"y": torch.full((2, 4, 2, 2), 0.5), "z": torch.full((2, 2, 1, 1), 0.25)}
    terms = rate_distortion(target + 0.1, target, likelihoods, lmbda=0.01)
    assert float(terms["bpp"]) == pytest.approx((2 * 16 * 1 + 2 * 2 * 2) / (2 * 64))
    assert float(terms["mse"]) == pytest.approx(0.01)
    assert float(terms["loss"]) == pytest.approx(0.01 * 255**2 * 0.01 + float(terms["bpp"]))
    patches = random_patches(torch.rand(3, 1, 20, 30), 8, per_image=2)
    assert patches.shape == (6, 1, 8, 8)
    assert random_patches(target, 16).shape == target.shape  # not smaller than the images: unchanged


def build_task(tmp_path: Path, *overrides: str) -> tuple[CompressionTask, object]:
    cfg = compose_config("train", ["experiment=secure_compression_synthetic", "data.num_workers=0",
                                   "data.source.num_samples=[32,8,8]", *overrides], output_dir=tmp_path / "run")
    try:
        datamodule = build_datamodule(cfg.data)
        task = instantiate(OmegaConf.to_container(cfg.task, resolve=True), _convert_="all", **datamodule.task_info())
    finally:
        GlobalHydra.instance().clear()
    return task, datamodule


def test_quantiles_have_their_own_parameter_group(tmp_path: Path) -> None:
    task, _ = build_task(tmp_path, "task.aux_lr=0.01")
    optimizer = task.configure_optimizers()["optimizer"]
    main, aux = optimizer.param_groups
    assert [p.shape for p in aux["params"]] == [task.net.entropy_bottleneck.quantiles.shape] and aux["lr"] == 0.01
    assert len(main["params"]) + 1 == len(list(task.parameters()))


def test_training_steps_lower_the_loss(tmp_path: Path) -> None:
    task, datamodule = build_task(tmp_path)
    datamodule.setup("fit")
    images = next(iter(datamodule.train_dataloader()))["image"]
    optimizer = task.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    losses, aux_losses = [], []
    for _ in range(30):
        _, terms = task.rd(images)
        aux = task.net.aux_loss()
        optimizer.zero_grad()
        (terms["loss"] + aux).backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
        aux_losses.append(float(aux.detach()))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert aux_losses[-1] < aux_losses[0]  # the quantiles move towards the bottleneck's tails


def test_trains_through_medsec_train_and_codes_after_loading(tmp_path: Path) -> None:
    run_verb("train", ["experiment=secure_compression_synthetic", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=4", "data.source.num_samples=[32,16,16]",
                       "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "logger=csv"], tmp_path)
    metrics = read_metrics(tmp_path)
    assert 0 < metrics["test/coded_bpp"] and math.isfinite(metrics["test/psnr"])
    # the estimate and the range coder agree to within the coder's few bytes per image
    assert metrics["test/coded_bpp"] == pytest.approx(metrics["test/bpp"], abs=0.5)
    from medsec.core.checkpoint import read_checkpoint

    state = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["state_dict"]  # weights_only=True
    assert not any("_quantized_cdf" in name for name in state)
    task = CompressionTask.load_from_checkpoint(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu",
                                                weights_only=True)
    assert task.net.entropy_bottleneck._quantized_cdf.numel() > 0  # rebuilt on loading
    assert task.net.eval().compress_image(torch.rand(1, 32, 32))[0]
