"""`medsec serve ckpt_path=...`: an HTTP service (FastAPI + uvicorn) that classifies ciphertexts.

The service holds the compiled model and, per client session, a public TenSEAL context. It never
accepts a context with a secret key, never logs bodies, and answers malformed or mismatched input
with a 4xx JSON ``{"error": ..., "field": ...}`` that names the field.
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import hydra
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig
from starlette.concurrency import run_in_threadpool

from medsec.crypto.he import HEInputError, HEProgram, HEServer, SecretKeyRefused, compile_model, pack, unpack
from medsec.errors import ConfigError
from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.run import save_resolved_config, user_errors_exit

log = logging.getLogger("medsec.serve")
SESSION_HEADER = "x-medsec-session"
MIB = 1 << 20


class RequestError(Exception):
    """An HTTP error with the field it is about."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field


async def read_body(request: Request, limit: int, field: str) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, field, f"{int(declared)} bytes exceed the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, field, f"more than the limit of {limit} bytes")
        chunks.append(chunk)
    if not size:
        raise RequestError(400, field, "empty body")
    return b"".join(chunks)


def build_app(program: HEProgram, precision_bits: int = 12, max_request_bytes: int = 512 * MIB,
              max_context_bytes: int = 160 * MIB, max_sessions: int = 8) -> FastAPI:
    """The service for ``program``; the limits are in bytes."""
    app = FastAPI(title="medsec homomorphic inference")
    card = program.card(precision_bits).to_dict()
    sessions: OrderedDict[str, HEServer] = OrderedDict()
    lock = threading.Lock()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        log.warning("refused (%d) %s: %s", err.status, err.field, err)
        return JSONResponse({"error": str(err), "field": err.field}, status_code=err.status)

    @app.get("/model")
    def model() -> dict:
        return card

    @app.post("/context")
    async def upload_context(request: Request) -> dict:
        data = await read_body(request, max_context_bytes, "context")
        try:
            server = await run_in_threadpool(HEServer, program, data)
        except SecretKeyRefused as err:
            raise RequestError(400, "context", str(err)) from None
        except HEInputError as err:
            raise RequestError(422, err.field, str(err)) from None
        session = secrets.token_urlsafe(16)
        with lock:
            sessions[session] = server
            while len(sessions) > max_sessions:
                sessions.popitem(last=False)
        log.info("session %s: public context of %d bytes", session[:6], len(data))
        return {"session": session}

    @app.post("/infer/{mode}")
    async def infer(mode: str, request: Request) -> Response:
        if mode not in card["params"]:
            raise RequestError(404, "mode", f"must be one of {sorted(card['params'])}, got {mode!r}")
        session = request.headers.get(SESSION_HEADER, "")
        with lock:
            server = sessions.get(session)
        if server is None:
            raise RequestError(401, SESSION_HEADER, "unknown session; POST /context first")
        data = await read_body(request, max_request_bytes, "ciphertexts")
        try:
            result = await run_in_threadpool(server.evaluate, mode, unpack(data, "ciphertexts"))
        except HEInputError as err:
            raise RequestError(422, err.field, str(err)) from None
        log.info("session %s: %s batch of %d bytes answered", session[:6], mode, len(data))
        return Response(pack(result), media_type="application/octet-stream")

    return app


def load_program(cfg: DictConfig) -> HEProgram:
    """The checkpoint's model compiled for CKKS, calibrated on its training images."""
    from medsec.attack import take
    from medsec.eval import load_run
    from medsec.he import images_of

    task, datamodule, _ = load_run(cfg, cfg.ckpt_path)
    calibration, _ = images_of(take(datamodule, "train", cfg.calibration_images))
    return compile_model(task.net.eval(), calibration)


@user_errors_exit
def run(cfg: DictConfig) -> None:
    if cfg.max_request_mib <= 0 or cfg.max_context_mib <= 0 or cfg.max_sessions < 1:
        raise ConfigError("max_request_mib, max_context_mib and max_sessions must be positive")
    save_resolved_config(cfg, Path(cfg.paths.output_dir))
    app = build_app(load_program(cfg), cfg.precision_bits, int(cfg.max_request_mib * MIB),
                    int(cfg.max_context_mib * MIB), cfg.max_sessions)
    log.info("serving %s on http://%s:%d", cfg.ckpt_path, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
