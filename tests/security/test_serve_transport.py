"""`medsec serve` over TLS for real (a throwaway CA, uvicorn on a loopback port), the client's
certificate verification and CA pinning, and plain HTTP refused beyond loopback on both sides."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medsec.errors import ConfigError
from medsec.he import HEClient
from medsec.he.remote import RemoteServer, check_remote_url, is_loopback_host
from medsec.he.service import build_app, serve_settings
from tests.he.tiny import tiny
from tests.security.serve_support import PRECISION, make_tls, running, token_file

TOKEN = "transport-token-" + "t" * 24


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_port(tls: dict[str, Path]):
    _, program, _ = tiny()
    app = build_app(program, PRECISION, tokens=[TOKEN])
    with running(app, ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"])) as port:
        yield port


def test_tls_round_trip_with_the_pinned_ca(tls: dict[str, Path], https_port: int, tmp_path: Path) -> None:
    net, _, images = tiny()
    tokens = token_file(tmp_path / "token", TOKEN)
    for host in ("127.0.0.1", "localhost"):
        remote = RemoteServer(f"https://{host}:{https_port}", ca_file=str(tls["ca"]), token_file=str(tokens))
        client = HEClient(remote.card(), "throughput")
        remote.upload_context(client.public_context())
        logits = client.decrypt(remote.evaluate("throughput", client.encrypt(images.numpy())), len(images))
        with torch.no_grad():
            assert np.abs(logits - net(images).double().numpy()).max() < 2.0 ** -8
        remote.delete_session()


@pytest.mark.parametrize("which", ["system", "other_ca"])
def test_tls_without_the_right_ca_fails_clearly(tls: dict[str, Path], https_port: int, which: str) -> None:
    ca_file = None if which == "system" else str(tls["other_ca"])
    remote = RemoteServer(f"https://127.0.0.1:{https_port}", ca_file=ca_file, token=TOKEN)
    with pytest.raises(ConfigError, match="TLS certificate of https://127.0.0.1:.* could not be verified.*"
                                          "remote_ca_file"):
        remote.card()


def test_plain_http_to_the_tls_port_and_bad_ca_file_fail_clearly(tls: dict[str, Path], https_port: int,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote: cannot reach http://127.0.0.1"):
        RemoteServer(f"http://127.0.0.1:{https_port}", timeout=10).card()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="remote_ca_file: cannot load CA certificates"):
        RemoteServer(f"https://127.0.0.1:{https_port}", ca_file=str(tmp_path / "junk.pem"))


def test_client_refuses_plain_http_beyond_loopback_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connection(*_args, **_kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr("httpx.Client.request", no_connection)
    monkeypatch.setattr("httpx.Client.send", no_connection)
    for url in ("http://example.org", "http://example.org:8000/", "http://10.0.0.5:8000", "http://0.0.0.0:8000",
                "http://[2001:db8::1]:8000", "http://127.0.0.1.example.org"):
        with pytest.raises(ConfigError, match="remote: plain http:// is only allowed to a loopback host"):
            RemoteServer(url)
    for url in ("ftp://127.0.0.1", "127.0.0.1:8000", "https://"):
        with pytest.raises(ConfigError, match="remote: "):
            RemoteServer(url)
    with pytest.raises(ConfigError, match="remote_ca_file: only used with an https:// remote"):
        RemoteServer("http://127.0.0.1:8000", ca_file="ca.pem")
    for url in ("http://127.0.0.1:8000", "http://127.8.9.10", "http://localhost:1", "http://[::1]:8000",
                "https://example.org"):
        assert check_remote_url(url).host
    assert is_loopback_host("LOCALHOST.") and not is_loopback_host("0.0.0.0") and not is_loopback_host("::")


def test_client_token_file_must_be_private(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote_token_file: .* accessible by group or others") as err:
        RemoteServer("http://127.0.0.1:1", token_file=str(token_file(tmp_path / "t", TOKEN, mode=0o640)))
    assert TOKEN not in str(err.value)


def settings(**overrides) -> dict:
    base = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "serve.yaml")
    base.pop("defaults")
    return serve_settings(OmegaConf.merge(base, overrides))


def test_server_refuses_plain_http_beyond_loopback(tls: dict[str, Path], tmp_path: Path) -> None:
    tokens = str(token_file(tmp_path / "tokens", TOKEN))
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ConfigError, match=f"host: serving on '{host}' .* needs TLS: set ssl_certfile"):
            settings(host=host, auth_token_file=tokens)
        with pytest.raises(ConfigError, match="auth_token_file: .* needs bearer tokens"):
            settings(host=host, ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]))
    ok = settings(host="0.0.0.0", ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]), auth_token_file=tokens)
    assert ok["uvicorn"]["ssl_certfile"] == str(tls["cert"]) and ok["uvicorn"]["ssl_keyfile"] == str(tls["key"])
    assert settings(host="127.0.0.1")["uvicorn"]["ssl_certfile"] is None
    with pytest.raises(ConfigError, match="ssl_certfile and ssl_keyfile: TLS needs both"):
        settings(ssl_certfile=str(tls["cert"]))
    open_key = tmp_path / "open.key"
    open_key.write_bytes(tls["key"].read_bytes())
    open_key.chmod(0o644)
    with pytest.raises(ConfigError, match="ssl_keyfile: .* accessible by group or others"):
        settings(ssl_certfile=str(tls["cert"]), ssl_keyfile=str(open_key))


def test_medsec_serve_refuses_to_start_on_0000_without_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The verb itself: a one-line error and exit status 2 before the checkpoint is even read."""
    from hydra.core.global_hydra import GlobalHydra

    from medsec.commands.serve import serve
    from medsec.errors import user_errors_exit
    from medsec.utils.config import compose_config

    cfg = compose_config("serve", [f"ckpt_path={tmp_path / 'missing.ckpt'}", "host=0.0.0.0"], output_dir=tmp_path)
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
            user_errors_exit(serve)(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2
    assert "host: serving on '0.0.0.0' (not loopback) needs TLS: set ssl_certfile and ssl_keyfile" in caplog.text
