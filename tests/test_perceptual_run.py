"""`crypto=perceptual` end to end: the model sees encrypted images, the run dir holds no key, and
eval under another key gives other results (the scheme has no key check: a wrong key is not refused).

The keys are fixed, not generated: with a fresh random key per session and a model trained two
epochs (at chance, its outputs nearly constant), whether another key changed the test loss by more
than 1e-4 depended on the key drawn (a fresh clone failed it once in three full runs)."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from medsec.data.datamodule import build_datamodule
from medsec.data.sources.synthetic import SyntheticSource
from medsec.protections import SecretKey
from medsec.protections.keys import write_key_file
from medsec.protections.perceptual import PerceptualEncrypt, PerceptualSource
from medsec.utils.config import compose_config
from tests.conftest import TINY, run_verb

KEY = SecretKey(bytes(range(7, 39)))
OTHER_KEY = SecretKey(bytes(range(101, 133)))


def perceptual(key_file: Path) -> list[str]:
    return ["crypto=perceptual", f"crypto.key.file={key_file}", "crypto.block_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Ten epochs: enough for the model to learn the encrypted images (test AUROC about 0.78), so
    that its outputs depend on the key's block arrangement."""
    root = tmp_path_factory.mktemp("perceptual")
    key_file = write_key_file(root / "keys" / "site.key", KEY)
    metrics = run_verb("train", [*TINY, "trainer.max_epochs=10", *perceptual(key_file)], root / "train")
    return {"root": root, "key": KEY, "key_file": key_file, "metrics": metrics, "dir": root / "train"}


def test_the_model_sees_8_bit_encrypted_images_scaled_to_unit(run: dict, tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY, *perceptual(run["key_file"])], output_dir=tmp_path)
    datamodule = build_datamodule(cfg.data, instantiate(cfg.crypto))
    assert isinstance(datamodule.source, PerceptualSource)
    datamodule.setup("fit")
    seen = datamodule.datasets["train"][0]["image"]
    plain = SyntheticSource(num_samples=[192, 64, 64], image_size=24, num_classes=3).sample(0, 0)["image"]
    expected = PerceptualEncrypt.from_key(run["key"], instantiate(cfg.crypto).scheme)(plain) / 255.0
    assert isinstance(seen, torch.Tensor) and seen.dtype == torch.float32
    np.testing.assert_allclose(seen.numpy(), expected, atol=1e-6)
    assert np.abs(seen.numpy() - np.round(plain * 255) / 255).mean() > 0.05  # not the plain image


def test_training_on_encrypted_images_gives_metrics_and_leaves_no_key(run: dict) -> None:
    metrics = run["metrics"]
    assert 0.4 < metrics["test/acc"] <= 1 and 0.7 < metrics["test/auroc"] <= 1  # learnt (chance: 1/3, 0.5)
    assert np.isfinite(metrics["test/loss"])
    assert (run["dir"] / "metrics.json").is_file() and (run["dir"] / "checkpoints" / "best.ckpt").is_file()
    raw = bytes.fromhex(run["key"].export_hex())
    seed = run["key"].derive("perceptual/v1/block8", 32)
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw), seed, seed.hex().encode()]
    files = [p for p in run["dir"].rglob("*") if p.is_file()]
    assert len(files) > 3
    assert not [(p, f) for p in files for f in forms if f in p.read_bytes()]
    assert str(run["key_file"]) in (run["dir"] / "config.yaml").read_text()  # the reference is kept


def test_eval_reproduces_with_the_key_and_differs_with_another(run: dict, tmp_path: Path) -> None:
    checkpoint = f"ckpt_path={run['dir'] / 'checkpoints' / 'best.ckpt'}"
    same = run_verb("eval", [checkpoint], tmp_path / "same")  # the stage the run was trained with
    assert same["test/loss"] == pytest.approx(run["metrics"]["test/loss"], abs=1e-6)
    other_key = write_key_file(tmp_path / "other.key", OTHER_KEY)
    wrong = run_verb("eval", [checkpoint, *perceptual(other_key)], tmp_path / "wrong")
    assert wrong["test/loss"] > same["test/loss"] + 0.05  # it fits one arrangement (measured: +0.23)
    probs = [pd.read_csv(tmp_path / name / "predictions.csv").filter(like="prob").to_numpy()
             for name in ("same", "wrong")]
    assert probs[0].shape == probs[1].shape and np.abs(probs[0] - probs[1]).max() > 0.1  # measured: 0.72
