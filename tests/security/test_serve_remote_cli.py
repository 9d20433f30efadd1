"""`medsec he --remote https://...` end to end against the app `medsec serve` builds from a
trained checkpoint, over TLS with a pinned CA and a bearer token; plain http:// to another host
refused before anything is sent."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from medsec.commands.serve import load_program
from medsec.errors import ConfigError
from medsec.he.service import build_app
from medsec.utils.config import compose_config
from tests.conftest import run_verb
from tests.security.serve_support import make_tls, running, token_file

TOKEN = "remote-cli-token-" + "r" * 24


def test_medsec_he_remote_over_tls_with_token(he_checkpoint: Path, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    cfg = compose_config("serve", [f"ckpt_path={he_checkpoint}", "calibration_images=64"], output_dir=tmp_path / "serve")
    try:
        program = load_program(cfg)
    finally:
        GlobalHydra.instance().clear()
    app = build_app(program, tokens=[TOKEN])
    tokens = token_file(tmp_path / "token", TOKEN)
    with running(app, ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"])) as port:
        report = run_verb("he", [f"ckpt_path={he_checkpoint}", "mode=throughput", "max_images=8", "calibration_images=64",
                                 f"remote=https://127.0.0.1:{port}", f"remote_ca_file={tls['ca']}",
                                 f"remote_token_file={tokens}"], tmp_path / "he")
        assert report["remote"] == f"https://127.0.0.1:{port}" and report["images"] == 8
        assert report["argmax_agreement"] == 1.0 and report["max_abs_logit_error"] < 2.0 ** -8
        assert app.state.stats["answered"] == 1
        with pytest.raises(ConfigError, match="remote: the TLS certificate .* could not be verified"):
            run_verb("he", [f"ckpt_path={he_checkpoint}", "max_images=8", "calibration_images=64",
                            f"remote=https://127.0.0.1:{port}", f"remote_token_file={tokens}"], tmp_path / "he2")


def test_medsec_he_refuses_plain_http_to_another_host(he_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote: plain http:// is only allowed to a loopback host"):
        run_verb("he", [f"ckpt_path={he_checkpoint}", "max_images=8", "calibration_images=64",
                        "remote=http://example.org:8000"], tmp_path)
