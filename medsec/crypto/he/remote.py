"""HTTP client of ``medsec serve``: fetch the model card, upload the public context once, then
send ciphertext batches. The secret key never leaves :class:`~medsec.crypto.he.client.HEClient`."""
from __future__ import annotations

from collections.abc import Sequence

import httpx

from medsec.crypto.he.compiler import ModelCard
from medsec.crypto.he.wire import pack, unpack
from medsec.errors import ConfigError

OCTETS = {"content-type": "application/octet-stream"}


class RemoteServer:
    """``url`` is the service root, e.g. ``http://127.0.0.1:8000``."""

    def __init__(self, url: str, timeout: float = 600.0, client: httpx.Client | None = None) -> None:
        self.http = client or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.url = url
        self.session: str | None = None

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = {"error": response.text[:200]}
            raise ConfigError(f"remote: {self.url} answered {response.status_code}: {detail.get('error')} "
                              f"(field: {detail.get('field')})")
        return response

    def card(self) -> ModelCard:
        """The served model's public description (input shape, CKKS parameters per mode)."""
        try:
            return ModelCard.from_dict(self._check(self.http.get("/model")).json())
        except httpx.TransportError as err:
            raise ConfigError(f"remote: cannot reach {self.url} ({err})") from None

    def upload_context(self, public_context: bytes) -> str:
        """Upload the public context; returns the session id the server keeps it under."""
        self.session = self._check(self.http.post("/context", content=public_context, headers=OCTETS)).json()["session"]
        return self.session

    def evaluate(self, mode: str, blobs: Sequence[bytes]) -> list[bytes]:
        """Encrypted logits for one batch of ciphertexts."""
        response = self.http.post(f"/infer/{mode}", content=pack(blobs),
                                  headers={**OCTETS, "x-medsec-session": self.session or ""})
        return unpack(self._check(response).content, "response")
