"""`medsec serve` stops an evaluation when its client disconnects (uvicorn for real, loopback)."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from medsec.he import HEServer, pack
from medsec.he.evaluator import EvaluationCancelled
from medsec.he.service import SESSION_HEADER, build_app
from tests.he.tiny import tiny
from tests.security.serve_support import PRECISION, card, he_client, public_context, running

IMAGES = 16
"""Latency images in the abandoned request: about 0.15 s of server CPU each on the tiny model."""


def wait_for(condition, timeout: float = 60.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)
    return time.monotonic() - start


def test_evaluator_stops_at_the_next_check() -> None:
    _, program, images = tiny()
    server = HEServer(program, public_context("latency"), card().params)
    blobs = he_client("latency").encrypt(images[:4].numpy())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(EvaluationCancelled) as err:
        server.evaluate("latency", blobs, cancel)
    assert (err.value.done, err.value.total) == (0, 4)
    throughput = HEServer(program, public_context("throughput"), card().params)
    with pytest.raises(EvaluationCancelled):
        throughput.evaluate("throughput", he_client("throughput").encrypt(images.numpy()), cancel)


def test_evaluation_is_cancelled_when_the_client_goes_away() -> None:
    _, program, images = tiny()
    app = build_app(program, PRECISION, max_images_per_request=IMAGES, disconnect_poll_s=0.05)
    client = he_client("latency")
    body = pack(client.encrypt(images[:1].repeat(IMAGES, 1, 1, 1).numpy()))
    with running(app) as port:
        url = f"http://127.0.0.1:{port}"
        sid = httpx.post(f"{url}/context", content=public_context("latency"), timeout=60).json()["session"]
        head = (f"POST /infer/latency HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
                f"{SESSION_HEADER}: {sid}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            wait_for(lambda: app.state.jobs.active == 1)
            time.sleep(0.5)  # the evaluation is under way (a few images of IMAGES)
        gone = time.monotonic()
        wait_for(lambda: app.state.stats["cancelled"])
        wait_for(lambda: app.state.jobs.active == 0)
        stopped_s = time.monotonic() - gone
        done, total = app.state.stats["cancelled"][0]
        assert total == IMAGES and done < IMAGES, (done, total)
        assert stopped_s < 3.0, f"the evaluation went on for {stopped_s:.1f} s after the client left"
        # the session and the service still work
        response = httpx.post(f"{url}/infer/latency", content=pack(client.encrypt(images[:1].numpy())),
                              headers={SESSION_HEADER: sid}, timeout=60)
        assert response.status_code == 200 and app.state.stats["answered"] == 1


def test_a_body_that_trickles_in_is_cut_off_with_408() -> None:
    """A slow (or stalled) upload cannot hold a job slot for ever."""
    _, program, _ = tiny()
    app = build_app(program, PRECISION, body_timeout_s=0.5)
    with running(app) as port:
        sid = httpx.post(f"http://127.0.0.1:{port}/context", content=public_context("throughput"),
                         timeout=60).json()["session"]
        head = (f"POST /infer/throughput HTTP/1.1\r\nhost: 127.0.0.1\r\n{SESSION_HEADER}: {sid}\r\n"
                "content-length: 100000\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"MEDSEC")  # and then nothing
            sock.settimeout(10)
            answer = b""
            while b"}" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"field":"ciphertexts"' in answer and b"took longer than 0.5 s" in answer
        wait_for(lambda: app.state.jobs.active == 0, timeout=5)
