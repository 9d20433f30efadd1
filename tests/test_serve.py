"""`medsec serve`'s FastAPI app: happy path, size limits, clear 4xx errors, no secrets taken or logged."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from medsec.cli import VERBS, value_flags
from medsec.errors import ConfigError
from medsec.he import HEClient, ModelCard, pack, unpack
from medsec.he.remote import RemoteServer
from medsec.he.service import SESSION_HEADER, build_app
from tests.he.tiny import tiny

MIB = 1 << 20


@pytest.fixture(scope="module")
def service() -> dict:
    net, program, images = tiny()
    http = TestClient(build_app(program, max_request_bytes=48 * MIB, max_context_bytes=8 * MIB))
    card = ModelCard.from_dict(http.get("/model").json())
    client = HEClient(card, "throughput")
    session = http.post("/context", content=client.public_context()).json()["session"]
    return {"http": http, "client": client, "session": session, "net": net, "images": images}


def infer(service: dict, body: bytes, session: str | None = None):
    return service["http"].post("/infer/throughput", content=body,
                                headers={SESSION_HEADER: session or service["session"]})


def test_happy_path_through_the_remote_client(service: dict) -> None:
    remote = RemoteServer("http://testserver", client=service["http"])
    card = remote.card()
    assert card.input_shape == (1, 8, 8) and card.params["throughput"].poly_modulus_degree == 8192
    client = service["client"]
    remote.upload_context(client.public_context())
    images = service["images"]
    logits = client.decrypt(remote.evaluate("throughput", client.encrypt(images.numpy())), len(images))
    with torch.no_grad():
        expected = service["net"](images).double().numpy()
    assert np.abs(logits - expected).max() < 2.0 ** -8


def test_oversize_request_is_refused_with_413(service: dict) -> None:
    response = infer(service, b"\0" * (48 * MIB + 1))
    assert response.status_code == 413 and response.json()["field"] == "ciphertexts"
    response = service["http"].post("/context", content=b"\0" * (8 * MIB + 1))
    assert response.status_code == 413 and response.json()["field"] == "context"


def test_malformed_ciphertexts_name_the_field(service: dict) -> None:
    blobs = service["client"].encrypt(service["images"][:1].numpy())
    response = infer(service, pack([blobs[0], b"not a ciphertext", *blobs[2:]]))
    assert response.status_code == 422 and response.json()["field"] == "ciphertexts[1]"
    assert "not a ciphertext for the uploaded context" in response.json()["error"]
    response = infer(service, b"junk")
    assert response.status_code == 422 and "not a medsec HE batch" in response.json()["error"]
    response = infer(service, pack(blobs[:3]))
    assert response.status_code == 422 and "expected 64 ciphertexts" in response.json()["error"]
    assert infer(service, pack(blobs), session="nope").json()["field"] == SESSION_HEADER
    assert service["http"].post("/infer/fast", content=b"x").status_code == 404
    response = service["http"].post("/context", content=b"not a context")
    assert response.status_code == 422 and response.json()["field"] == "context"


def test_context_with_secret_key_is_refused_and_not_logged(service: dict, caplog: pytest.LogCaptureFixture) -> None:
    secret = service["client"].context.serialize(save_secret_key=True)
    with caplog.at_level(logging.DEBUG):
        response = service["http"].post("/context", content=secret)
    assert response.status_code == 400 and response.json()["field"] == "context"
    assert "holds a secret key" in response.json()["error"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused (400) context" in logged
    assert all(len(record.getMessage()) < 400 for record in caplog.records)
    assert secret[len(secret) // 2:len(secret) // 2 + 24].hex() not in logged
    assert repr(secret[len(secret) // 2:len(secret) // 2 + 24])[2:-1] not in logged


def test_remote_client_reports_http_errors_with_the_field(service: dict) -> None:
    remote = RemoteServer("http://testserver", client=service["http"])
    remote.session = "expired"
    with pytest.raises(ConfigError, match=rf"401: unknown session.*field: {SESSION_HEADER}"):
        remote.evaluate("throughput", [b"x"])
    assert unpack(pack([b"a"])) == [b"a"]


def test_remote_flag_becomes_the_remote_override() -> None:
    assert value_flags(["ckpt_path=a", "--remote", "http://127.0.0.1:8000", "mode=latency"]) == \
        ["ckpt_path=a", "remote=http://127.0.0.1:8000", "mode=latency"]
    assert value_flags(["--remote=http://h:1"]) == ["remote=http://h:1"]
    assert "he" in VERBS and "serve" in VERBS
