"""`medsec he` end to end: train a tiny he_cnn on synthetic images, classify them under CKKS."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsec.errors import ConfigError
from tests.conftest import run_verb


def test_he_throughput_report(he_checkpoint: Path, tmp_path: Path) -> None:
    report = run_verb("he", [f"ckpt_path={he_checkpoint}", "mode=throughput", "max_images=16",
                             "calibration_images=64"], tmp_path)
    assert json.loads((tmp_path / "he_report.json").read_text()) == report
    assert (tmp_path / "plots" / "he_logits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["images"] == 16 and report["mode"] == "throughput"
    assert report["argmax_agreement"] == 1.0 and report["max_abs_logit_error"] < 2.0 ** -8
    assert report["encrypted"]["acc"] == pytest.approx(report["plaintext"]["acc"])
    assert report["encrypted"]["auroc"] == pytest.approx(report["plaintext"]["auroc"], abs=0.005)
    assert report["server_context_has_secret_key"] is False
    assert report["params"]["poly_modulus_degree"] == 8192 and report["params"]["depth"] == 5
    # one ciphertext per pixel (144) for the batch of 16 images
    assert report["ciphertext_bytes_per_image"] * 16 > 144 * 10_000
    for key in ("ms_per_image", "ms_per_image_server", "public_context_bytes", "peak_memory_mib"):
        assert report[key] > 0


def test_he_latency_report(he_checkpoint: Path, tmp_path: Path) -> None:
    report = run_verb("he", [f"ckpt_path={he_checkpoint}", "mode=latency", "max_images=3",
                             "calibration_images=64"], tmp_path)
    assert report["images"] == 3 and report["mode"] == "latency"
    assert report["argmax_agreement"] == 1.0 and report["max_abs_logit_error"] < 2.0 ** -8
    assert report["params"]["depth"] == 5  # no extra level: the diagonal products rescale once per layer


def test_he_rejects_an_unknown_mode(he_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode must be one of"):
        run_verb("he", [f"ckpt_path={he_checkpoint}", "mode=fast"], tmp_path)


def test_bfv_equals_the_quantised_model_exactly(he_checkpoint: Path, tmp_path: Path) -> None:
    report = run_verb("he", [f"ckpt_path={he_checkpoint}", "scheme=bfv", "mode=throughput", "max_images=8",
                             "calibration_images=64"], tmp_path)
    assert report["scheme"] == "bfv" and report["images"] == 8
    assert report["max_abs_error_vs_compiled"] == 0.0  # the quantised model's logits, bit for bit
    assert report["encrypted"] == report["compiled"]
    assert report["max_abs_logit_error"] < 0.5  # 6-bit weights: close to the float network, not equal
    assert report["server_context_has_secret_key"] is False


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheme=bfv", "+bfv.bits=3"], "bfv: .*unexpected keyword argument 'bits'"),
    (["scheme=bfv", "remote=https://127.0.0.1:1"], "remote: `medsec serve` speaks CKKS"),
    (["scheme=paillier2"], "unknown homomorphic scheme 'paillier2'"),
])
def test_he_refuses_bad_scheme_settings(he_checkpoint: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_verb("he", [f"ckpt_path={he_checkpoint}", "max_images=2", "calibration_images=16", *overrides], tmp_path)


def test_paillier_evaluates_the_linear_head_on_encrypted_features(he_checkpoint: Path, tmp_path: Path) -> None:
    report = run_verb("he", [f"ckpt_path={he_checkpoint}", "scheme=paillier", "paillier.key_bits=1024", "max_images=4",
                             "calibration_images=16"], tmp_path)
    assert json.loads((tmp_path / "he_report.json").read_text()) == report
    assert report["scheme"] == "paillier" and report["images"] == 4 and report["within_bound"] is True
    assert report["argmax_agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-5
    assert report["key_bits"] == 1024 and report["request_bytes_per_image"] > 0
