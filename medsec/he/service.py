"""The HTTP service of `medsec serve` (FastAPI + uvicorn): classifies CKKS ciphertexts.

The service holds the compiled model and, per client session, a public TenSEAL context. It never
accepts a context with a secret key, never logs bodies or tokens, and answers malformed or
mismatched input with a 4xx JSON ``{"error": ..., "field": ...}`` that names the field.

Untrusted input, and what bounds it:

- **Who**: with ``auth_token_file`` every endpoint but ``GET /model`` (the public model card)
  needs ``Authorization: Bearer TOKEN`` (401 otherwise); each token (one per line of the file) is
  one client identity. Without it (loopback only) all clients share one identity.
- **Transport**: plain HTTP on a loopback host only; any other ``host`` needs ``ssl_certfile`` and
  ``ssl_keyfile`` (TLS) and ``auth_token_file``, or the service refuses to start.
- **Contexts**: must match the model card's N, modulus chain and scale for a mode (422 ``context``)
  and take at most twice ``max_context_mib`` once decompressed (checked before TenSEAL inflates them);
  every ciphertext must be fresh, non-transparent, at the card's level and scale (422 naming it);
  a SEAL error during an evaluation is a 422 ``ciphertexts``, never a 500.
- **Work**: at most ``max_jobs`` context loads and evaluations at once; more are refused at once
  with 503 and ``Retry-After`` (no queue), before their body is read. Bodies are capped in bytes
  (413) and time (408); a latency request carries at most ``max_images_per_request`` images (413
  ``ciphertexts``). An evaluation stops when its client disconnects.
- **Sessions**: at most ``max_sessions_per_client`` per identity (a new one replaces that
  client's own oldest) and ``max_sessions`` in all (429, never another client's session evicted);
  idle sessions expire after ``session_idle_s``; ``DELETE /context`` drops one's own session.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medsec.errors import ConfigError
from medsec.he import HEInputError, HEProgram, HEServer, SecretKeyRefused, pack, unpack
from medsec.he.evaluator import EvaluationCancelled
from medsec.he.remote import SESSION_HEADER, is_loopback_host, read_private_file, read_tokens

log = logging.getLogger("medsec.serve")
MIB = 1 << 20
ANONYMOUS = "local"
"""The one client identity when authentication is off (loopback only)."""
CLIENT_GONE = 499
"""Status logged (nginx's convention) when the client disconnected before its answer."""


class RequestError(Exception):
    """An HTTP error with the field it is about."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}


async def read_body(request: Request, limit: int, field: str, timeout_s: float = 300.0) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or sent)
    and with 408 when it takes longer than ``timeout_s`` to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, field, f"{int(declared)} bytes exceed the limit of {limit}")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, field, f"more than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, field, f"the body took longer than {timeout_s:g} s to arrive") from None
    except ClientDisconnect:
        raise RequestError(CLIENT_GONE, field, "the client disconnected while sending the body") from None
    if not body:
        raise RequestError(400, field, "empty body")
    return body


@dataclass
class Session:
    owner: str
    server: HEServer
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    """Client sessions (a public context each): at most ``per_client`` per owner, a new one
    replacing that owner's oldest, and at most ``total`` in all, a new one refused (429) rather
    than another owner's evicted. Sessions idle for ``idle_s`` expire."""

    def __init__(self, total: int, per_client: int, idle_s: float) -> None:
        self.total, self.per_client, self.idle_s = total, per_client, idle_s
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._items.items() if now - s.last_used > self.idle_s]:
            log.info("session %s of %s expired after %.0f s idle", sid[:6], self._items[sid].owner, self.idle_s)
            del self._items[sid]

    def _owned(self, owner: str) -> list[str]:
        return [sid for sid, s in self._items.items() if s.owner == owner]

    def check_room(self, owner: str) -> None:
        """429 if a new session of ``owner`` could not be added now."""
        with self._lock:
            self._expire()
            if len(self._owned(owner)) < self.per_client and len(self._items) >= self.total:
                raise RequestError(429, "session", f"the service holds its maximum of {self.total} sessions; "
                                                   "retry later", {"retry-after": "60"})

    def add(self, owner: str, server: HEServer) -> tuple[str, str | None]:
        """A new session id for ``server``, and the id of the owner's session it replaced (if any)."""
        with self._lock:
            self._expire()
            owned, replaced = self._owned(owner), None
            if len(owned) >= self.per_client:
                replaced = owned[0]  # the owner's own oldest (least recently used)
                del self._items[replaced]
            elif len(self._items) >= self.total:
                raise RequestError(429, "session", f"the service holds its maximum of {self.total} sessions; "
                                                   "retry later", {"retry-after": "60"})
            sid = secrets.token_urlsafe(16)
            self._items[sid] = Session(owner, server)
            return sid, replaced

    def get(self, owner: str, sid: str) -> HEServer | None:
        """The owner's session ``sid`` (another owner's is as unknown as a made-up one)."""
        with self._lock:
            self._expire()
            session = self._items.get(sid)
            if session is None or not hmac.compare_digest(session.owner, owner):
                return None
            session.last_used = time.monotonic()
            self._items.move_to_end(sid)
            return session.server

    def delete(self, owner: str, sid: str) -> bool:
        with self._lock:
            session = self._items.get(sid)
            if session is None or session.owner != owner:
                return False
            del self._items[sid]
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def owners(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for s in self._items.values():
                counts[s.owner] = counts.get(s.owner, 0) + 1
            return counts


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the system once no job runs (glibc keeps them
    otherwise, and the service's RSS would stay at its peak)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Jobs:
    """At most ``limit`` jobs (context loads and evaluations) at once; one more is refused with
    503 and ``Retry-After`` (no queue)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.active = self.peak = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, what: str) -> Iterator[None]:
        with self._lock:
            if self.active >= self.limit:
                raise RequestError(503, "request", f"busy: {self.active} jobs (context loads and evaluations) "
                                                   f"running, the limit is {self.limit}; retry after "
                                                   f"{self.retry_after_s} s", {"retry-after": str(self.retry_after_s)})
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
                idle = self.active == 0
            if idle:
                _release_free_memory()


def build_app(program: HEProgram, precision_bits: int = 12, max_request_bytes: int = 512 * MIB,
              max_context_bytes: int = 160 * MIB, max_sessions: int = 8, *, max_sessions_per_client: int = 4,
              max_images_per_request: int = 16, max_jobs: int = 2, retry_after_s: int = 5,
              session_idle_s: float = 3600.0, body_timeout_s: float = 300.0,
              tokens: Sequence[str] | None = None, disconnect_poll_s: float = 0.1) -> FastAPI:
    """The service for ``program``; the limits are in bytes, images, jobs, sessions and seconds.
    ``tokens`` (bearer tokens, one per client identity) turn authentication on."""
    app = FastAPI(title="medsec homomorphic inference", docs_url=None, redoc_url=None, openapi_url=None)
    max_inflated = 2 * max_context_bytes  # a context's keys decompressed (about the memory it takes); 1.7x typical
    model_card = program.card(precision_bits)
    card = model_card.to_dict()
    sessions = Sessions(max_sessions, max_sessions_per_client, session_idle_s)
    jobs = Jobs(max_jobs, retry_after_s)
    identities = [(f"client{i}", token.encode()) for i, token in enumerate(tokens or (), 1)]
    app.state.sessions, app.state.jobs = sessions, jobs
    app.state.stats = {"cancelled": [], "answered": 0}

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        log.warning("refused (%d) %s: %s", err.status, err.field, err)
        return JSONResponse({"error": str(err), "field": err.field}, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        field_ = "method" if err.status_code == 405 else "path"
        return JSONResponse({"error": f"{err.detail}: {request.method} {request.url.path}", "field": field_},
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:  # a bug: logged here, not sent
        log.error("internal error (%s)", type(err).__name__, exc_info=err)
        return JSONResponse({"error": "internal error; the server log says more", "field": None}, status_code=500)

    def authenticate(request: Request) -> str:
        """The client identity behind the request's bearer token (401 without a valid one)."""
        if not identities:
            return ANONYMOUS
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        challenge = {"www-authenticate": 'Bearer realm="medsec"'}
        if scheme.lower() != "bearer" or not value.strip():
            raise RequestError(401, "authorization", "a bearer token is required (header Authorization: Bearer "
                                                     "TOKEN)", challenge)
        given, owner = value.strip().encode(), None
        for name, token in identities:  # every token compared, in constant time each
            if hmac.compare_digest(given, token) and owner is None:
                owner = name
        if owner is None:
            raise RequestError(401, "authorization", "the bearer token is not valid", challenge)
        return owner

    def session_of(request: Request, owner: str) -> tuple[str, HEServer]:
        sid = request.headers.get(SESSION_HEADER, "")
        server = sessions.get(owner, sid) if sid else None
        if server is None:
            raise RequestError(401, SESSION_HEADER, "unknown session; POST /context first")
        return sid, server

    @app.get("/model")
    def model() -> dict:
        return card

    @app.post("/context")
    async def upload_context(request: Request) -> dict:
        owner = authenticate(request)
        sessions.check_room(owner)
        with jobs.slot("context"):
            data = await read_body(request, max_context_bytes, "context", body_timeout_s)
            try:
                server = await run_in_threadpool(HEServer, program, data, model_card.params, max_inflated)
            except SecretKeyRefused as err:
                raise RequestError(400, "context", str(err)) from None
            except HEInputError as err:
                raise RequestError(422, err.field, str(err)) from None
        session, replaced = sessions.add(owner, server)
        log.info("session %s of %s: public context of %d bytes for %s%s", session[:6], owner, len(data),
                 "/".join(server.modes), f" (replaces its session {replaced[:6]})" if replaced else "")
        return {"session": session, "modes": list(server.modes)}

    @app.delete("/context")
    async def delete_context(request: Request) -> dict:
        owner = authenticate(request)
        sid = request.headers.get(SESSION_HEADER, "")
        if not sid or not sessions.delete(owner, sid):
            raise RequestError(404, SESSION_HEADER, "no such session of yours")
        log.info("session %s of %s deleted", sid[:6], owner)
        return {"deleted": sid}

    async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(disconnect_poll_s)

    @app.post("/infer/{mode}")
    async def infer(mode: str, request: Request) -> Response:
        owner = authenticate(request)
        if mode not in card["params"]:
            raise RequestError(404, "mode", f"must be one of {sorted(card['params'])}, got {mode!r}")
        session, server = session_of(request, owner)
        if mode not in server.modes:
            raise RequestError(422, "context", f"the session's context has the parameters of "
                                               f"{'/'.join(server.modes)}, not of {mode} (GET /model)")
        with jobs.slot(mode):
            data = await read_body(request, max_request_bytes, "ciphertexts", body_timeout_s)
            size = len(data)
            try:
                blobs = unpack(data, "ciphertexts")
            except HEInputError as err:
                raise RequestError(422, err.field, str(err)) from None
            del data
            if mode == "latency" and len(blobs) > max_images_per_request:
                raise RequestError(413, "ciphertexts", f"{len(blobs)} images in one latency request, the limit is "
                                                       f"{max_images_per_request}; split the batch")
            cancel = threading.Event()
            watcher = asyncio.create_task(watch_disconnect(request, cancel))
            try:
                result = await run_in_threadpool(server.evaluate, mode, blobs, cancel)
            except HEInputError as err:
                raise RequestError(422, err.field, str(err)) from None
            except EvaluationCancelled as err:
                app.state.stats["cancelled"].append((err.done, err.total))
                log.warning("session %s of %s: the client went away; %s evaluation cancelled after %d of %d steps",
                            session[:6], owner, mode, err.done, err.total)
                return Response(status_code=CLIENT_GONE)
            finally:
                cancel.set()  # also stops the evaluation thread if this request itself is cancelled
                watcher.cancel()
        app.state.stats["answered"] += 1
        log.info("session %s of %s: %s batch of %d bytes answered", session[:6], owner, mode, size)
        return Response(pack(result), media_type="application/octet-stream")

    return app


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")


def serve_settings(cfg: DictConfig) -> dict:
    """Check the service's config before anything is loaded; returns the keyword arguments of
    :func:`build_app` (less the program) and of ``uvicorn.run``.

    Raises:
        ConfigError: a limit that is not positive; TLS half configured or its key file readable by
            others; a token file that is missing, readable by others or holds no token; a
            non-loopback ``host`` without TLS or without tokens.
    """
    _positive(cfg, "max_request_mib", "max_context_mib", "max_sessions", "max_sessions_per_client",
              "max_images_per_request", "max_jobs", "retry_after_s", "session_idle_s", "body_timeout_s",
              "max_connections")
    if cfg.max_sessions_per_client > cfg.max_sessions:
        raise ConfigError(f"max_sessions_per_client ({cfg.max_sessions_per_client}) exceeds max_sessions "
                          f"({cfg.max_sessions})")
    certfile, keyfile = cfg.get("ssl_certfile"), cfg.get("ssl_keyfile")
    if bool(certfile) != bool(keyfile):
        raise ConfigError("ssl_certfile and ssl_keyfile: TLS needs both (a certificate and its private key)")
    if certfile:
        if not Path(certfile).expanduser().is_file():
            raise ConfigError(f"ssl_certfile: no such file {certfile}")
        read_private_file(keyfile, "ssl_keyfile")
    token_file = cfg.get("auth_token_file")
    tokens = read_tokens(token_file, "auth_token_file") if token_file else None
    if not is_loopback_host(str(cfg.host)):
        if not certfile:
            raise ConfigError(f"host: serving on {cfg.host!r} (not loopback) needs TLS: set ssl_certfile and "
                              "ssl_keyfile, or host=127.0.0.1. Over plain HTTP a party on the path could alter the "
                              "encrypted logits (CKKS ciphertexts are malleable) and the client would not notice")
        if not tokens:
            raise ConfigError(f"auth_token_file: serving on {cfg.host!r} (not loopback) needs bearer tokens "
                              "(a file readable by its owner only, one token per line)")
    app_kwargs = dict(precision_bits=cfg.precision_bits, max_request_bytes=int(cfg.max_request_mib * MIB),
                      max_context_bytes=int(cfg.max_context_mib * MIB), max_sessions=int(cfg.max_sessions),
                      max_sessions_per_client=int(cfg.max_sessions_per_client),
                      max_images_per_request=int(cfg.max_images_per_request), max_jobs=int(cfg.max_jobs),
                      retry_after_s=int(math.ceil(cfg.retry_after_s)), session_idle_s=float(cfg.session_idle_s),
                      body_timeout_s=float(cfg.body_timeout_s), tokens=tokens)
    uvicorn_kwargs = dict(host=cfg.host, port=cfg.port, ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
                          limit_concurrency=int(cfg.max_connections))
    return {"app": app_kwargs, "uvicorn": uvicorn_kwargs}
