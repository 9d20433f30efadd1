"""HTTP client of ``medsec serve``: fetch the model card, upload the public context once, then
send ciphertext batches. The secret key never leaves :class:`~medsec.he.client.HEClient`.

Transport rules (the same on the server side, see :mod:`medsec.he.service`): ``https://`` with the
certificate verified (system CAs, or the CA file pinned with ``ca_file``), and plain ``http://``
only to a loopback host. A party on the path holding only the public context can negate or
rescale CKKS logits in transit (ciphertexts are malleable) and the client would notice nothing,
so an unverified channel to another machine is refused before any connection. A bearer token
(read from ``token_file``, which must not be readable by group or others) authenticates the client.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from medsec.errors import ConfigError
from medsec.he.compiler import ModelCard
from medsec.he.wire import HEInputError, pack, unpack

OCTETS = {"content-type": "application/octet-stream"}
SESSION_HEADER = "x-medsec-session"
MIN_TOKEN_CHARS = 16


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_private_file(path: str | os.PathLike, field: str) -> str:
    """The text of a secret file (a token, a TLS key) that must be a regular file not readable or
    writable by group or others; :class:`ConfigError` naming ``field`` otherwise. The message
    never holds the file's content."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except OSError as err:
        raise ConfigError(f"{field}: cannot read {path} ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{field}: {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(f"{field}: {path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                          f"chmod 600 {path}")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}: cannot read {path} ({type(err).__name__})") from None


def read_tokens(path: str | os.PathLike, field: str) -> list[str]:
    """The bearer tokens in ``path``: one per line (blank lines and ``#`` comments skipped), each
    at least :data:`MIN_TOKEN_CHARS` printable characters without spaces."""
    tokens = []
    for number, line in enumerate(read_private_file(path, field).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_CHARS or not line.isprintable() or any(c.isspace() for c in line):
            raise ConfigError(f"{field}: line {number} of {path} is not a token (at least {MIN_TOKEN_CHARS} "
                              "printable characters without spaces; e.g. python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
        tokens.append(line)
    if not tokens:
        raise ConfigError(f"{field}: {path} holds no token")
    return tokens


def check_remote_url(url: str, ca_file: str | None = None) -> httpx.URL:
    """``url`` if it is ``https://HOST[:PORT]`` or ``http://`` to a loopback host; :class:`ConfigError`
    naming ``remote`` otherwise (before any connection)."""
    try:
        parsed = httpx.URL(url)
    except Exception as err:  # httpx.InvalidURL and friends
        raise ConfigError(f"remote: not a URL: {url!r} ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"remote: expected https://HOST[:PORT] (or http://127.0.0.1:PORT), got {url!r}")
    if parsed.scheme == "http" and not is_loopback_host(parsed.host):
        raise ConfigError(f"remote: plain http:// is only allowed to a loopback host (127.0.0.1, ::1, localhost), "
                          f"got {parsed.host!r}; use https:// (a party on the path could alter the encrypted "
                          "logits: CKKS ciphertexts are malleable)")
    if ca_file and parsed.scheme != "https":
        raise ConfigError(f"remote_ca_file: only used with an https:// remote, got {url!r}")
    return parsed


class RemoteServer:
    """``url`` is the service root, e.g. ``https://host:8443`` or ``http://127.0.0.1:8000``.

    ``ca_file`` pins the CA that signed the server's certificate (default: the system's CAs);
    ``token_file`` holds the bearer token (its first token is sent). ``client`` replaces the HTTP
    client (tests), and with it the URL checks. A busy server's 503 is retried after its
    Retry-After (at most ``max_wait_s`` each) for up to ``busy_timeout_s`` (default ``timeout``).
    """

    def __init__(self, url: str, timeout: float = 600.0, client: httpx.Client | None = None,
                 ca_file: str | None = None, token_file: str | None = None, token: str | None = None,
                 busy_timeout_s: float | None = None, max_wait_s: float = 30.0) -> None:
        self.url = url
        self.busy_timeout_s = timeout if busy_timeout_s is None else busy_timeout_s
        self.max_wait_s = max_wait_s
        if token is None and token_file:
            token = read_tokens(token_file, "remote_token_file")[0]
        self._auth = {"authorization": f"Bearer {token}"} if token else {}
        if client is None:
            parsed = check_remote_url(url, ca_file)
            verify: ssl.SSLContext | bool = True
            if parsed.scheme == "https":
                try:
                    verify = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
                except (OSError, ssl.SSLError) as err:
                    raise ConfigError(f"remote_ca_file: cannot load CA certificates from {ca_file} ({err})") from None
            client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, verify=verify)
        self.http = client
        self.session: str | None = None

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json()
                detail = detail if isinstance(detail, dict) else {"error": str(detail)[:200]}
            except ValueError:
                detail = {"error": response.text[:200]}
            raise ConfigError(f"remote: {self.url} answered {response.status_code}: {detail.get('error')} "
                              f"(field: {detail.get('field')})")
        return response

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, retried while the server answers 503 (busy); transport errors become a
        :class:`ConfigError` that says what failed (an unverified certificate names ``remote_ca_file``)."""
        headers = {**self._auth, **kwargs.pop("headers", {})}
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as err:
                text = str(err)
                if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(err.__cause__, ssl.SSLCertVerificationError):
                    raise ConfigError(f"remote: the TLS certificate of {self.url} could not be verified ({text[:200]}); "
                                      "pin the CA that signed it with remote_ca_file=PATH") from None
                raise ConfigError(f"remote: cannot reach {self.url} ({type(err).__name__}: {text[:200]})") from None
            if response.status_code != 503:
                return self._check(response)
            try:
                wait = min(max(float(response.headers.get("retry-after", "1")), 0.1), self.max_wait_s)
            except ValueError:
                wait = 1.0
            if time.monotonic() + wait > deadline:
                return self._check(response)
            time.sleep(wait)

    def card(self) -> ModelCard:
        """The served model's public description (input shape, CKKS parameters per mode)."""
        return ModelCard.from_dict(self._request("GET", "/model").json())

    def upload_context(self, public_context: bytes) -> str:
        """Upload the public context; returns the session id the server keeps it under."""
        self.session = self._request("POST", "/context", content=public_context, headers=OCTETS).json()["session"]
        return self.session

    def delete_session(self) -> None:
        """Drop this client's session (and its context) on the server."""
        if self.session:
            self._request("DELETE", "/context", headers={SESSION_HEADER: self.session})
            self.session = None

    def evaluate(self, mode: str, blobs: Sequence[bytes]) -> list[bytes]:
        """Encrypted logits for one batch of ciphertexts."""
        response = self._request("POST", f"/infer/{mode}", content=pack(blobs),
                                 headers={**OCTETS, SESSION_HEADER: self.session or ""})
        try:
            return unpack(response.content, "response")
        except HEInputError as err:
            raise ConfigError(f"remote: {self.url} answered a malformed batch ({err})") from None
