#!/usr/bin/env python
"""Abuse `medsec serve` on loopback and write the ``serve-loadtest`` section of BENCHMARKS.md.

The service (a child process: the app of ``medsec serve`` under uvicorn, bearer tokens on, a tiny
he_cnn compiled in place, no training) gets, for ``--seconds``, concurrent clients sending:
valid throughput and latency requests, oversized bodies, malformed bodies (junk, truncated
batches, transparent or rescaled ciphertexts), too many latency images, wrong contexts (another
N, another scale, a secret key, a decompression bomb), unauthenticated and wrong-token requests,
requests whose client disconnects mid-evaluation, and session eviction attempts (another
client filling the service, using or deleting the victim's session). It counts the answers by
status, asserts that no answer is a 5xx other than the designed 503 (busy, with Retry-After),
samples the server's RSS (before, peak, after), checks that the victim's session still answers
correctly and that no token reached the server log.

    python scripts/loadtest_serve.py                         # about 2 minutes on 2 cores
    python scripts/loadtest_serve.py --seconds 30 --output /tmp/B.md --note "Another job ran meanwhile."
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import tenseal as ts
import torch

from medsec.he import HEClient, HEProgram, ModelCard, pack, unpack
from medsec.he.testing import bomb_context, free_port, rescaled, tiny_program, transparent
from medsec.he.wire import ciphertext_to_bytes
from medsec.utils.benchmarks import benchmark_parser, machine_summary, update_section

SECTION = "serve-loadtest"
MIB = 1 << 20
LIMITS = {"max_request_bytes": 32 * MIB, "max_context_bytes": 100 * MIB, "max_sessions": 4,
          "max_sessions_per_client": 2, "max_images_per_request": 8, "max_jobs": 2, "retry_after_s": 1}
SESSION = "x-medsec-session"


def serve_child(port: int, tokens: Path, log_path: Path) -> None:
    """The server process: the app `medsec serve` builds, under uvicorn on 127.0.0.1."""
    import uvicorn

    from medsec.he.remote import read_tokens
    from medsec.he.service import build_app

    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _, program, _ = tiny_program()
    app = build_app(program, 12, tokens=read_tokens(tokens, "auth_token_file"), **LIMITS)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, limit_concurrency=64)


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy (all processes, all cores)."""
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def own_cpu_s(server: psutil.Process) -> float:
    """CPU-seconds of this script and of the server process."""
    total = 0.0
    for process in (psutil.Process(), server):
        times = process.cpu_times()
        total += times.user + times.system
    return total


class Tally:
    """Answers by scenario and status (``transport`` for a request that got no answer)."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.problems: list[str] = []
        self.lock = threading.Lock()

    def add(self, scenario: str, status: int | str, expected: set[int] | None = None, detail: str = "") -> None:
        with self.lock:
            self.counts[scenario][status] += 1
            if isinstance(status, int) and status >= 500 and status != 503:
                self.problems.append(f"{scenario}: {status} {detail[:200]}")
            elif expected is not None and status not in expected and status != 503:
                self.problems.append(f"{scenario}: expected {sorted(expected)}, got {status} {detail[:200]}")


def load_test(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    _, program, images = tiny_program()
    tokens = {name: secrets.token_urlsafe(32) for name in ("victim", "attacker", "client")}
    token_file = work / "tokens"
    token_file.touch(mode=0o600)
    token_file.write_text("".join(f"{t}\n" for t in tokens.values()))
    port, log_path = free_port(), work / "serve.log"
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--tokens", str(token_file),
                              "--log", str(log_path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                card = ModelCard.from_dict(httpx.get(f"{url}/model", timeout=2).json())
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the service did not start")
        server = psutil.Process(child.pid)
        started_mib = server.memory_info().rss / MIB
        busy_before, ours_before = busy_cpu_s(), own_cpu_s(server)
        result = run_clients(args, url, card, tokens, program, images, server, log_path)
        result["cpu"] = {"ours_s": own_cpu_s(server) - ours_before, "all_s": busy_cpu_s() - busy_before}
        result["rss"]["started_mib"] = started_mib
        return result
    finally:
        child.terminate()
        child.wait(timeout=30)


def run_clients(args: argparse.Namespace, url: str, card: ModelCard, tokens: dict[str, str], program: HEProgram,
                images: torch.Tensor, server: psutil.Process, log_path: Path) -> dict[str, Any]:
    auth = {name: {"authorization": f"Bearer {token}"} for name, token in tokens.items()}
    thr, lat = HEClient(card, "throughput"), HEClient(card, "latency")
    thr_public, lat_public = thr.public_context(), lat.public_context()
    thr_blobs = thr.encrypt(images.numpy())
    lat_blobs = lat.encrypt(images[:1].numpy())
    bodies = {
        "throughput": pack(thr_blobs), "latency": pack(lat_blobs * 2), "too_many": pack(lat_blobs * 9),
        "disconnect": pack(lat_blobs * 8), "junk": os.urandom(4096), "truncated": pack(thr_blobs)[:-1000],
        "scale": pack([rescaled(thr, thr_blobs[0]), *thr_blobs[1:]]),
        "transparent": pack([*thr_blobs[:5], transparent(thr, thr_blobs[5]), *thr_blobs[6:]]),
        "foreign": pack([ciphertext_to_bytes(ts.ckks_vector(other_context(card, 2.0 ** 30), [0.5]).ciphertext()[0]),
                         *thr_blobs[1:]]),
        "oversized": b"\0" * (LIMITS["max_request_bytes"] + 1),
    }
    contexts = {"other_n": other_context(card, None, 16384).serialize(save_secret_key=False),
                "other_scale": other_context(card, 2.0 ** 30).serialize(save_secret_key=False),
                "secret": thr.context.serialize(save_secret_key=True, save_galois_keys=False),
                "bomb": bomb_context(thr_public, 8192)}  # 7 MB declaring about 45 GB of key data
    tally = Tally()
    http = httpx.Client(base_url=url, timeout=120)

    def post(scenario: str, path: str, body: bytes, headers: dict, expected: set[int] | None) -> httpx.Response | None:
        try:
            response = http.post(path, content=body, headers=headers)
        except httpx.HTTPError as err:
            tally.add(scenario, "transport", detail=str(err))
            return None
        if response.status_code == 503 and "retry-after" not in response.headers:
            tally.problems.append(f"{scenario}: 503 without Retry-After")
        tally.add(scenario, response.status_code, expected, response.text)
        return response

    def session(name: str, public: bytes) -> str | None:
        for _ in range(30):
            response = post(f"context ({name})", "/context", public, auth[name], {200, 429})
            if response is not None and response.status_code == 200:
                return response.json()["session"]
            time.sleep(1)
        return None

    victim = session("victim", thr_public)
    client_thr, client_lat = session("client", thr_public), session("client", lat_public)
    assert victim and client_thr and client_lat, "could not open the sessions"
    rss = {"before_mib": server.memory_info().rss / MIB, "peak_mib": 0.0}
    deadline = time.monotonic() + args.seconds
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                rss["peak_mib"] = max(rss["peak_mib"], server.memory_info().rss / MIB)
            except psutil.Error:
                return
            time.sleep(0.2)

    def valid() -> None:
        rng = random.Random(1)
        while time.monotonic() < deadline:
            if rng.random() < 0.5:
                response = post("valid throughput", "/infer/throughput", bodies["throughput"],
                                {**auth["client"], SESSION: client_thr}, {200})
            else:
                response = post("valid latency", "/infer/latency", bodies["latency"],
                                {**auth["client"], SESSION: client_lat}, {200})
            if response is not None and response.status_code == 503:
                time.sleep(float(response.headers.get("retry-after", 1)))

    def abuse() -> None:
        rng = random.Random(2)
        headers = {**auth["client"], SESSION: client_thr}
        cases = [
            ("oversized body", "/infer/throughput", bodies["oversized"], headers, {413}),
            ("junk body", "/infer/throughput", bodies["junk"], headers, {422}),
            ("truncated batch", "/infer/throughput", bodies["truncated"], headers, {422}),
            ("rescaled ciphertext", "/infer/throughput", bodies["scale"], headers, {422}),
            ("transparent ciphertext", "/infer/throughput", bodies["transparent"], headers, {422}),
            ("foreign ciphertext", "/infer/throughput", bodies["foreign"], headers, {422}),
            ("too many images", "/infer/latency", bodies["too_many"], {**auth["client"], SESSION: client_lat}, {413}),
            ("context N=16384", "/context", contexts["other_n"], auth["client"], {422, 429}),
            ("context other scale", "/context", contexts["other_scale"], auth["client"], {422, 429}),
            ("context with secret key", "/context", contexts["secret"], auth["client"], {400, 429}),
            ("context decompression bomb", "/context", contexts["bomb"], auth["client"], {422, 429}),
            ("no token", "/infer/throughput", bodies["throughput"], {SESSION: client_thr}, {401}),
            ("wrong token", "/context", thr_public, {"authorization": "Bearer " + "x" * 43}, {401}),
            ("unknown mode", "/infer/fast", b"x", headers, {404}),
        ]
        while time.monotonic() < deadline:
            post(*rng.choice(cases))
            time.sleep(0.05)

    def evict() -> None:
        """The attacker fills the service with sessions and goes after the victim's."""
        while time.monotonic() < deadline:
            post("attacker new session", "/context", thr_public, auth["attacker"], {200, 429})
            post("attacker uses victim's session", "/infer/throughput", bodies["throughput"],
                 {**auth["attacker"], SESSION: victim}, {401})
            try:
                response = http.request("DELETE", "/context", headers={**auth["attacker"], SESSION: victim})
                tally.add("attacker deletes victim's session", response.status_code, {404})
            except httpx.HTTPError as err:
                tally.add("attacker deletes victim's session", "transport", detail=str(err))
            time.sleep(0.5)

    def disconnect() -> None:
        head = (f"POST /infer/latency HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
                f"authorization: Bearer {tokens['client']}\r\n{SESSION}: {client_lat}\r\n"
                f"content-length: {len(bodies['disconnect'])}\r\n\r\n").encode()
        host, port = url.removeprefix("http://").split(":")
        while time.monotonic() < deadline:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head + bodies["disconnect"])
                time.sleep(0.4)
                sock.settimeout(0.05)
                try:
                    answered = sock.recv(16)  # a 503 (busy) comes at once; an evaluation takes > 1 s
                except (TimeoutError, OSError):
                    answered = b""
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
            code = answered[9:12]
            outcome: int | str = int(code) if code.isdigit() else "reset while evaluating"
            with tally.lock:
                tally.counts["disconnect mid-request"][outcome] += 1
            time.sleep(0.2 if outcome == 503 else 1.5)  # busy: try again soon, to get a slot and leave it

    threads = [threading.Thread(target=f) for f in (sampler, valid, valid, abuse, abuse, evict, disconnect)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    wall = time.monotonic() - start
    time.sleep(3)  # let cancelled evaluations finish
    # the victim's session survived the abuse and answers correctly
    response = http.post("/infer/throughput", content=bodies["throughput"], headers={**auth["victim"], SESSION: victim})
    victim_ok = response.status_code == 200
    if victim_ok:
        logits = thr.decrypt(unpack(response.content), len(images))
        error = float(np.abs(logits - program.forward(images.reshape(len(images), -1).double().numpy())).max())
        victim_ok = error < 2.0 ** -8
    time.sleep(2)
    stop.set()
    threads[0].join()
    rss["after_mib"] = server.memory_info().rss / MIB
    log_text = log_path.read_text() if log_path.exists() else ""
    leaked = [name for name, token in tokens.items() if token in log_text or token[:16] in log_text]
    return {"counts": {k: dict(v) for k, v in tally.counts.items()}, "problems": tally.problems, "wall_s": wall,
            "rss": rss, "victim_ok": victim_ok, "tokens_in_log": leaked,
            "cancelled": log_text.count("evaluation cancelled"), "log_lines": log_text.count("\n")}


def other_context(card: ModelCard, scale: float | None, degree: int | None = None) -> ts.Context:
    params = card.params["throughput"]
    context = ts.context(ts.SCHEME_TYPE.CKKS, degree or params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    context.global_scale = scale or 2.0 ** params.scale_bits
    return context


def render(result: dict[str, Any], args: argparse.Namespace, load_before: tuple[float, ...]) -> str:
    rows, totals = [], collections.Counter()
    for scenario, counts in sorted(result["counts"].items()):
        totals.update({k: v for k, v in counts.items() if k != "reset while evaluating"})
        rows.append(f"| {scenario} | " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)) + " |")
    fivexx = sum(v for k, v in totals.items() if isinstance(k, int) and k >= 500 and k != 503)
    rss = result["rss"]
    return "\n".join([
        "## `medsec serve` under abuse (load test)", "",
        f"Command: `python scripts/loadtest_serve.py --seconds {args.seconds:g}` ({time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{result['elapsed_s']:.0f} s in all).",
        f"Machine: {machine_summary()}. Load average before the run: "
        f"{', '.join(f'{x:.2f}' for x in load_before)} (1/5/15 min); during the run other processes used "
        f"{max(0.0, result['cpu']['all_s'] - result['cpu']['ours_s']):.0f} CPU-s, the load test and the service "
        f"{result['cpu']['ours_s']:.0f} CPU-s (of {2 * result['wall_s']:.0f} on 2 cores)."
        f"{' ' + args.note if args.note else ''}", "",
        "Service: the app of `medsec serve` under uvicorn on 127.0.0.1 in a child process, bearer tokens on "
        f"(3 identities), the tests' tiny he_cnn (8x8 images, N=8192), limits {LIMITS}. Clients for "
        f"{result['wall_s']:.0f} s: 2 threads of valid requests (throughput 8 images, latency 2), 2 of malformed "
        "and unauthorised ones, 1 attacker filling the sessions and going after the victim's, 1 client that "
        "sends an 8-image latency request and resets the connection 0.4 s later.", "",
        "| scenario | answers by status |", "|---|---|", *rows, "",
        f"- Answers: {sum(totals.values())}; 5xx other than 503-busy: **{fivexx}**; 503 (busy, all with "
        f"Retry-After): {totals.get(503, 0)}; no answer (transport error): {totals.get('transport', 0)}.",
        f"- Evaluations cancelled after the client went away (server log): {result['cancelled']}, of "
        f"{result['counts'].get('disconnect mid-request', {}).get('reset while evaluating', 0)} connections reset "
        "while their request held a job slot.",
        f"- Server RSS: {rss['started_mib']:.0f} MiB started, {rss['before_mib']:.0f} MiB with the 3 sessions "
        f"open before the abuse, peak {rss['peak_mib']:.0f} MiB during it, {rss['after_mib']:.0f} MiB after.",
        f"- The victim's session after the abuse: {'answers, logits correct' if result['victim_ok'] else '**FAILED**'}; "
        f"tokens in the server log: {result['tokens_in_log'] or 'none'}.",
        f"- Unexpected answers: {len(result['problems'])}" + (f" (first: {result['problems'][:3]})"
                                                               if result["problems"] else ""),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--note", default="", help="a sentence for the section, e.g. what else ran on the machine")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_child(args.serve, Path(args.tokens), Path(args.log))
        return 0
    load_before, start = os.getloadavg(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = load_test(args, Path(tmp))
    result["elapsed_s"] = time.monotonic() - start
    markdown = render(result, args, load_before)
    print(markdown)
    fivexx = sum(v for counts in result["counts"].values() for k, v in counts.items()
                 if isinstance(k, int) and k >= 500 and k != 503)
    ok = fivexx == 0 and result["victim_ok"] and not result["tokens_in_log"] and not result["problems"]
    update_section(args.output, SECTION, markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
