"""The compressive autoencoder: shapes, quantisation, the learned prior and training through task=denoising."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medsec.models.compression import CompressiveAutoencoder
from tests.conftest import read_metrics, run_verb


def tiny(**kwargs: object) -> CompressiveAutoencoder:
    torch.manual_seed(0)
    return CompressiveAutoencoder(**{"channels": (8, 16), "latent_channels": 4, "levels": 5, **kwargs})


def test_shapes_and_integer_latent_for_any_size() -> None:
    model = tiny().eval()
    with torch.no_grad():
        model.to_latent.conv.weight.mul_(30)  # spread the latent over all levels
    x = torch.rand(2, 1, 37, 50)
    latent = model.encode(x)
    assert latent.dtype == torch.int64 and latent.shape == (2, 4, 10, 13)  # ceil(37 / 4), ceil(50 / 4)
    assert latent.abs().max() <= 2 and latent.unique().numel() >= 3
    out = model(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    # evaluation: forward is exactly decode(encode(x))
    torch.testing.assert_close(out, model.decode(latent, x.shape[2:]), rtol=0, atol=0)


def test_training_quantisers() -> None:
    x = torch.rand(2, 1, 16, 16)
    ste = tiny(quantiser="ste").train()
    latent = ste.analyse(x)
    assert torch.equal(ste.quantise(latent), torch.round(latent))  # forward value: rounded
    ste(x).mean().backward()
    assert ste.to_latent.conv.weight.grad.abs().sum() > 0  # ... but gradients reach the encoder
    noisy = tiny(quantiser="noise").train().quantise(latent)
    assert 0 < (noisy - latent).abs().max() <= 0.5 and not torch.equal(noisy, torch.round(noisy))


def test_prior_fits_the_latent_histogram_and_prices_bits() -> None:
    model = tiny(prior_momentum=0.0).eval()
    x = torch.rand(3, 1, 16, 16)
    latent = model.encode(x)
    model.fit_prior(x)
    counts = torch.stack([torch.bincount(latent[:, c].flatten() + 2, minlength=5) for c in range(4)]).float() + 1
    torch.testing.assert_close(model.prior, counts / counts.sum(1, keepdim=True))
    manual = -sum(math.log2(model.prior[c, int(v) + 2]) for c in range(4) for v in latent[:, c].flatten())
    assert model.estimated_bits(latent) == pytest.approx(manual, rel=1e-5)


def test_training_forward_moves_the_prior_towards_the_batch() -> None:
    model = tiny(prior_momentum=0.5).train()
    before = model.prior.clone()
    model(torch.rand(2, 1, 16, 16))
    assert not torch.allclose(model.prior, before)
    torch.testing.assert_close(model.prior.sum(1), torch.ones(4))
    model.eval()(torch.rand(2, 1, 16, 16))
    after_eval = model.prior.clone()
    model(torch.rand(2, 1, 16, 16))
    assert torch.equal(model.prior, after_eval)  # evaluation leaves the prior alone


@pytest.mark.parametrize("kwargs, message", [({"levels": 4}, "odd"), ({"levels": 1}, "odd"),
                                             ({"quantiser": "round"}, "quantiser"), ({"latent_channels": 0}, "latent")])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_trains_through_the_denoising_task(tmp_path: Path) -> None:
    from medsec.tasks.denoising import DenoisingTask

    run_verb("train", ["experiment=secure_compression_synthetic", "trainer.max_epochs=2",
                       "trainer.limit_train_batches=8", "callbacks.rich_progress_bar=null",
                       "callbacks.model_summary=null", "logger=csv"], tmp_path)
    metrics = read_metrics(tmp_path)
    # 16 steps already take the output well past the untrained network's near-uniform grey
    assert metrics["test/psnr_gaussian_0.05"] > 10
    task = DenoisingTask.load_from_checkpoint(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu")
    assert isinstance(task.net, CompressiveAutoencoder) and task.net.latent_channels == 8
    assert not torch.allclose(task.net.prior, torch.full_like(task.net.prior, 0.2))  # the prior was learned
