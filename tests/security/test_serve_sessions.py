"""`medsec serve`: bearer tokens, per-client session quotas (nobody evicts another client's
session), DELETE of one's own session, and the bound on concurrent jobs (503 + Retry-After)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from omegaconf import OmegaConf

from medsec.errors import ConfigError
from medsec.he import pack
from medsec.he.remote import RemoteServer
from medsec.he.service import SESSION_HEADER, build_app, serve_settings
from tests.he.tiny import tiny
from tests.security.serve_support import PRECISION, he_client, public_context, token_file

ALICE, BOB = "alice-token-" + "a" * 20, "bob-token-" + "b" * 20
MIB = 1 << 20


def app(**kwargs) -> TestClient:
    _, program, _ = tiny()
    return TestClient(build_app(program, PRECISION, max_request_bytes=64 * MIB, max_context_bytes=8 * MIB, **kwargs),
                      raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def upload(http: TestClient, token: str | None = None):
    return http.post("/context", content=public_context("throughput"), headers=bearer(token) if token else {})


@functools.lru_cache(maxsize=1)
def batch() -> bytes:
    return pack(he_client("throughput").encrypt(tiny()[2][:2].numpy()))


def infer(http: TestClient, sid: str, token: str | None = None):
    return http.post("/infer/throughput", content=batch(),
                     headers={SESSION_HEADER: sid, **(bearer(token) if token else {})})


def test_without_or_with_a_wrong_token_is_401_and_model_stays_public(caplog: pytest.LogCaptureFixture) -> None:
    http = app(tokens=[ALICE, BOB])
    assert http.get("/model").status_code == 200  # the public model card needs no token
    with caplog.at_level(logging.DEBUG):
        for headers in ({}, {"authorization": "Basic abc"}, bearer("wrong-" + "x" * 20), bearer(ALICE[:-1]),
                        bearer(ALICE + "x")):
            for response in (http.post("/context", content=b"x", headers=headers),
                             http.post("/infer/throughput", content=b"x", headers=headers),
                             http.request("DELETE", "/context", headers=headers)):
                assert response.status_code == 401, response.text
                assert response.json()["field"] == "authorization"
                assert response.headers["www-authenticate"].startswith("Bearer")
        response = upload(http, ALICE)
        assert response.status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ALICE not in logged and ALICE[:12] not in logged and BOB not in logged
    assert "of client1" in logged  # identities are logged by name, never by token


def test_sessions_belong_to_their_client() -> None:
    http = app(tokens=[ALICE, BOB])
    alice = upload(http, ALICE).json()["session"]
    assert infer(http, alice, ALICE).status_code == 200
    # Bob cannot use, nor delete, Alice's session: it is as unknown to him as a made-up one
    response = infer(http, alice, BOB)
    assert response.status_code == 401 and response.json()["field"] == SESSION_HEADER
    response = http.request("DELETE", "/context", headers={SESSION_HEADER: alice, **bearer(BOB)})
    assert response.status_code == 404 and response.json()["field"] == SESSION_HEADER
    assert infer(http, alice, ALICE).status_code == 200
    # Alice deletes her own
    response = http.request("DELETE", "/context", headers={SESSION_HEADER: alice, **bearer(ALICE)})
    assert response.status_code == 200 and response.json() == {"deleted": alice}
    assert infer(http, alice, ALICE).status_code == 401


def test_a_client_replaces_its_own_oldest_and_never_evicts_another() -> None:
    http = app(tokens=[ALICE, BOB], max_sessions=3, max_sessions_per_client=2)
    alice = upload(http, ALICE).json()["session"]
    bob = [upload(http, BOB).json()["session"] for _ in range(2)]
    assert len(http.app.state.sessions) == 3
    # the global cap is reached: Alice (1 of her 2) is refused rather than anyone evicted
    response = upload(http, ALICE)
    assert response.status_code == 429 and response.json()["field"] == "session"
    assert "retry-after" in response.headers
    # Bob, at his quota, may go on: each new session replaces his own oldest
    for _ in range(3):
        bob.append(upload(http, BOB).json()["session"])
    assert infer(http, alice, ALICE).status_code == 200
    assert infer(http, bob[-1], BOB).status_code == 200 and infer(http, bob[-2], BOB).status_code == 200
    assert infer(http, bob[0], BOB).status_code == 401
    assert http.app.state.sessions.owners() == {"client1": 1, "client2": 2}
    # once Bob deletes one, Alice has room again
    http.request("DELETE", "/context", headers={SESSION_HEADER: bob[-1], **bearer(BOB)})
    assert upload(http, ALICE).status_code == 200


def test_without_authentication_all_clients_are_one_identity() -> None:
    http = app(max_sessions=8, max_sessions_per_client=2)
    first, second, third = (upload(http).json()["session"] for _ in range(3))
    assert infer(http, first).status_code == 401  # replaced by the third: the same (local) client's oldest
    assert infer(http, third).status_code == 200 and http.app.state.sessions.owners() == {"local": 2}


def test_idle_sessions_expire() -> None:
    http = app(max_sessions=1, max_sessions_per_client=1, session_idle_s=1e-9, tokens=[ALICE, BOB])
    upload(http, ALICE)
    assert upload(http, BOB).status_code == 200  # Alice's idle session expired, so Bob has room
    assert http.app.state.sessions.owners() == {"client2": 1}


def test_concurrent_jobs_beyond_the_bound_get_503_with_retry_after() -> None:
    http = app(max_jobs=1, retry_after_s=7)
    sid = upload(http).json()["session"]
    jobs = http.app.state.jobs
    with jobs.slot("held by the test"):  # as if an evaluation were running
        for response in (infer(http, sid), upload(http)):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "7" and response.json()["field"] == "request"
    assert jobs.active == 0 and infer(http, sid).status_code == 200 and jobs.peak == 1


def test_remote_client_retries_after_503(monkeypatch: pytest.MonkeyPatch) -> None:
    http = app(max_jobs=1, retry_after_s=1)
    jobs = http.app.state.jobs
    remote = RemoteServer("http://testserver", client=http, busy_timeout_s=5, max_wait_s=0.01)
    slot = jobs.slot("held")
    slot.__enter__()
    released = []

    def sleep(_: float) -> None:  # the client's wait: the job finishes meanwhile
        if not released:
            slot.__exit__(None, None, None)
            released.append(True)

    monkeypatch.setattr("medsec.he.remote.time.sleep", sleep)
    assert remote.upload_context(public_context("throughput"))
    assert released == [True]
    # a server that stays busy: the 503 is reported once the client's patience is spent
    impatient = RemoteServer("http://testserver", client=http, busy_timeout_s=0)
    with jobs.slot("held again"), pytest.raises(ConfigError, match="503: busy.*field: request"):
        impatient.upload_context(public_context("throughput"))


def test_remote_client_sends_its_token(tmp_path: Path) -> None:
    http = app(tokens=[ALICE])
    remote = RemoteServer("http://testserver", client=http, token_file=str(token_file(tmp_path / "t", ALICE)))
    assert remote.upload_context(public_context("throughput"))
    remote.delete_session()
    anonymous = RemoteServer("http://testserver", client=http)
    with pytest.raises(ConfigError, match="401: a bearer token is required.*field: authorization"):
        anonymous.upload_context(public_context("throughput"))


def settings(tmp_path: Path, **overrides) -> dict:
    base = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "serve.yaml")
    base.pop("defaults")
    return serve_settings(OmegaConf.merge(base, overrides))


def test_token_file_must_be_private_and_hold_tokens(tmp_path: Path) -> None:
    good = token_file(tmp_path / "tokens", ALICE, BOB)
    assert settings(tmp_path, auth_token_file=str(good))["app"]["tokens"] == [ALICE, BOB]
    with pytest.raises(ConfigError, match="auth_token_file: .* accessible by group or others") as err:
        settings(tmp_path, auth_token_file=str(token_file(tmp_path / "open", ALICE, mode=0o644)))
    assert ALICE not in str(err.value)
    with pytest.raises(ConfigError, match="auth_token_file: line 1 .* not a token") as err:
        settings(tmp_path, auth_token_file=str(token_file(tmp_path / "short", "short")))
    with pytest.raises(ConfigError, match="auth_token_file: .* holds no token"):
        settings(tmp_path, auth_token_file=str(token_file(tmp_path / "empty", "# nothing")))
    with pytest.raises(ConfigError, match="auth_token_file: cannot read"):
        settings(tmp_path, auth_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="max_images_per_request must be a positive number"):
        settings(tmp_path, max_images_per_request=0)
    with pytest.raises(ConfigError, match="max_sessions_per_client .* exceeds max_sessions"):
        settings(tmp_path, max_sessions=2, max_sessions_per_client=3)
