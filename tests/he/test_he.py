"""Compiled CKKS evaluation against PyTorch in both modes, key custody, sizes and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch
from torch import nn

from medsec.errors import ConfigError
from medsec.he import HEClient, HEInputError, HEServer, SecretKeyRefused, compile_model, pack, unpack
from medsec.he.wire import ciphertext_to_bytes
from medsec.models import Classifier, small_cnn
from tests.he.tiny import tiny

PRECISION = 12
TOLERANCE = 2.0 ** -(PRECISION - 4)
"""Largest accepted |encrypted - PyTorch| logit: 16x the planned precision."""


@pytest.fixture(scope="module", params=["throughput", "latency"])
def flow(request: pytest.FixtureRequest) -> dict:
    """One encrypted round trip of the tiny model's images (8; 2 in latency mode, one request each)."""
    mode = request.param
    net, program, images = tiny()
    images = images if mode == "throughput" else images[:2]
    client = HEClient(program.card(PRECISION), mode)
    public = client.public_context()
    server = HEServer(program, public)
    blobs = client.encrypt(images.numpy())
    result = server.evaluate(mode, blobs)
    return {"mode": mode, "net": net, "program": program, "images": images, "client": client, "server": server,
            "public": public, "blobs": blobs, "result": result, "logits": client.decrypt(result, len(images))}


def test_compiled_program_matches_pytorch_in_float64() -> None:
    net, program, images = tiny()
    with torch.no_grad():
        expected = net(images).double().numpy()
    assert np.abs(program.forward(images.reshape(8, -1).double().numpy()) - expected).max() < 1e-5
    assert program.depth == 5 and program.widths == [32, 4, 2]
    assert program.latency_slots() == 64  # 8x8 pixels, the largest layer side


def test_encrypted_logits_match_pytorch(flow: dict) -> None:
    with torch.no_grad():
        expected = flow["net"](flow["images"]).double().numpy()
    error = np.abs(flow["logits"] - expected).max()
    assert flow["logits"].shape == (len(flow["images"]), 2)
    assert error < TOLERANCE, f"{flow['mode']}: max logit error {error}"
    assert (flow["logits"].argmax(1) == expected.argmax(1)).all()


def test_server_side_context_cannot_decrypt(flow: dict) -> None:
    server_context = flow["server"].context
    assert server_context.is_public() and not server_context.has_secret_key()
    assert not ts.context_from(flow["public"]).has_secret_key()
    with pytest.raises(ValueError, match="(?i)secret key"):
        server_context.secret_key()
    # the client's own context does hold it, and the server refuses that one
    with pytest.raises(SecretKeyRefused, match="context: holds a secret key"):
        HEServer(flow["program"], flow["client"].context.serialize(save_secret_key=True, save_galois_keys=False))


def test_sizes_are_reported(flow: dict) -> None:
    sizes = [len(blob) for blob in flow["blobs"]]
    if flow["mode"] == "throughput":  # one ciphertext per pixel for the whole batch, one per logit back
        assert len(sizes) == 64 and len(flow["result"]) == 2
    else:  # one ciphertext per image, one logit vector back per image
        assert len(sizes) == 2 and len(flow["result"]) == 2
    assert min(sizes) > 10_000 and len(flow["public"]) > 100_000
    assert unpack(pack(flow["blobs"])) == flow["blobs"]


def test_malformed_and_mismatched_ciphertexts_name_the_field(flow: dict) -> None:
    server, blobs, mode = flow["server"], list(flow["blobs"]), flow["mode"]
    with pytest.raises(HEInputError, match=r"ciphertexts\[1\]: not a "):
        server.evaluate(mode, [blobs[0], b"garbage", *blobs[2:]])
    with pytest.raises(HEInputError, match="ciphertexts: expected"):
        server.evaluate(mode, blobs[:1] if mode == "throughput" else [])
    with pytest.raises(HEInputError, match="mode: must be one of"):
        server.evaluate("fast", blobs)
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])  # another context
    other.global_scale = 2.0 ** 20
    vector = ts.ckks_vector(other, [0.5] * 16)
    foreign = ciphertext_to_bytes(vector.ciphertext()[0])
    with pytest.raises(HEInputError, match=r"ciphertexts\[0\]: not a "):
        server.evaluate(mode, [foreign, *blobs[1:]])


def test_packed_batches_reject_bad_framing() -> None:
    packed = pack([b"abc", b"defg"])
    with pytest.raises(HEInputError, match="ciphertexts: not a medsec HE batch"):
        unpack(b"junk")
    with pytest.raises(HEInputError, match=r"ciphertexts\[1\]: truncated"):
        unpack(packed[:-1])
    with pytest.raises(HEInputError, match="unexpected bytes"):
        unpack(packed + b"x")


def test_models_ckks_cannot_run_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"layer '2' \(ReLU\) cannot be evaluated under CKKS"):
        compile_model(small_cnn(2, width=4).eval(), torch.rand(2, 1, 8, 8))
    relu_net = Classifier(nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.ReLU(), nn.Flatten()), 32, 2).eval()
    with pytest.raises(ConfigError, match=r"layer '1' \(ReLU\) cannot be evaluated under CKKS"):
        compile_model(relu_net, torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="needs model=he_cnn"):
        compile_model(nn.Linear(4, 2), torch.rand(2, 4))
