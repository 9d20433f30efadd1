#!/usr/bin/env python
"""Benchmark the AES-GCM security stage and write the ``aes`` section of BENCHMARKS.md.

1. Raw AES-256-GCM throughput of medsec's envelope (``cryptography``'s AESGCM) against
   ``openssl speed -evp aes-256-gcm`` at the same buffer sizes on the same machine.
2. Per-record cost of the encrypted store (encode + seal, read + unseal + decode) for 28x28 and
   256x256 8-bit images.
3. Training epoch time with ``crypto=aes`` against plaintext, same recipe and data (PneumoniaMNIST,
   small CNN), with the in-memory cache on (decrypt once) and off (decrypt every item in the
   DataLoader workers).

    python scripts/benchmark_aes.py                         # about 8 minutes on 2 cores
    python scripts/benchmark_aes.py --quick --output /tmp/B.md
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsec import api
from medsec.protections import KeyRef, SecretKey
from medsec.protections.aes import seal
from medsec.protections.keys import write_key_file
from medsec.protections.store import RecordStore, write_store
from medsec.utils.benchmarks import benchmark_parser, machine_summary, parse_args, publish, timed_train

SECTION = "aes"
SIZES = {"28x28 image (784 B)": 784, "256x256 image (64 KiB)": 65536, "16 KiB": 16384, "1 MiB": 1 << 20}
GOAL_RAW = 0.80
GOAL_EPOCH = 1.05


def gcm_throughput(size: int, seconds: float) -> float:
    """Bytes per second of medsec's envelope (:func:`medsec.protections.aes.seal`: AES-256-GCM with a
    fresh nonce) on ``size``-byte buffers."""
    cipher, data = AESGCM(os.urandom(32)), os.urandom(size)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            seal(cipher, data, b"aad")
        count += 16
    return count * size / (time.perf_counter() - start)


def openssl_throughput(size: int, seconds: int) -> float | None:
    """Bytes per second from ``openssl speed -evp aes-256-gcm`` at ``size`` bytes (None without openssl)."""
    try:
        out = subprocess.run(["openssl", "speed", "-evp", "aes-256-gcm", "-seconds", str(seconds), "-bytes", str(size)],
                             capture_output=True, text=True, timeout=60 + 4 * seconds).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k", out, re.MULTILINE | re.IGNORECASE)
    return float(match.group(1)) * 1000 if match else None


def bench_raw(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for name, size in SIZES.items():
        ours, ref = gcm_throughput(size, seconds), openssl_throughput(size, max(1, int(seconds)))
        rows.append({"buffer": name, "bytes": size, "medsec_MBps": ours / 1e6,
                     "openssl_MBps": ref / 1e6 if ref else None, "ratio": ours / ref if ref else None})
        print(f"[aes] {name}: {ours / 1e6:.0f} MB/s vs openssl {ref and ref / 1e6:.0f} MB/s", flush=True)
    return rows


def bench_records(key_ref: KeyRef, work: Path, count: int) -> list[dict[str, Any]]:
    rows = []
    for name, edge in (("28x28 uint8", 28), ("256x256 uint8", 256)):
        images = np.random.default_rng(0).integers(0, 256, (count, 1, edge, edge), dtype=np.uint8)
        records = [{"id": f"r{i}", "image": images[i], "label": i % 2} for i in range(count)]
        start = time.perf_counter()
        path = write_store(work / f"records-{edge}", {"train": records, "val": [], "test": []},
                           dataset_id=f"bench-{edge}", description={}, key_ref=key_ref, overwrite=True)
        write_s = time.perf_counter() - start
        store = RecordStore(path, key_ref)
        start = time.perf_counter()
        for i in range(count):
            store.read("train", i)
        read_s = time.perf_counter() - start
        rows.append({"record": name, "encrypt_us": 1e6 * write_s / count, "decrypt_us": 1e6 * read_s / count,
                     "envelope_overhead_B": store.records["train"][0][2] - images[0].nbytes})
        print(f"[aes] {name}: encrypt {rows[-1]['encrypt_us']:.1f} us, decrypt {rows[-1]['decrypt_us']:.1f} us", flush=True)
    return rows


def bench_epochs(work: Path, quick: bool, reps: int) -> list[dict[str, Any]]:
    base = ["data=medmnist", "model=small_cnn", "model.net.width=32", "test=false", "trainer.limit_val_batches=1",
            "callbacks.rich_progress_bar=null",
            *(["trainer.max_epochs=2", "trainer.limit_train_batches=3"] if quick
              else ["trainer.max_epochs=3", "trainer.limit_train_batches=20"])]
    rows = []
    for cache in ("true", "false"):
        times: dict[str, list[float]] = {"plain": [], "aes": []}
        for rep in range(reps):
            for mode in ("plain", "aes"):  # interleaved, so drift hits both alike
                extra = ["crypto=aes"] if mode == "aes" else []
                _, epochs, _ = timed_train([*base, f"data.cache={cache}", *extra], work / f"{mode}-{cache}-{rep}")
                times[mode] += [e["seconds"] for e in epochs[1:]]  # the first epoch warms up workers and caches
        plain, aes = statistics.median(times["plain"]), statistics.median(times["aes"])
        rows.append({"cache": cache == "true", "plain_s": plain, "aes_s": aes, "ratio": aes / plain,
                     "epochs_measured": len(times["aes"])})
        print(f"[aes] cache={cache}: plain {plain:.2f} s/epoch, aes {aes:.2f} s/epoch, ratio {aes / plain:.3f}", flush=True)
    return rows


def render(raw: list[dict], records: list[dict], epochs: list[dict], args: argparse.Namespace) -> str:
    def ratio_cell(r: float | None, goal: float, above: bool) -> str:
        if r is None:
            return "-"
        ok = r >= goal if above else r <= goal
        return f"{r:.2f} {'(goal met)' if ok else '**(MISSED)**'}"

    lines = [f"Command: `python scripts/benchmark_aes.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d')}). Machine: {machine_summary()}.", "",
             "**Raw AES-256-GCM** (medsec's envelope `medsec.protections.aes.seal`: `cryptography` AESGCM, fresh 96-bit nonce, "
             "in place from 64 KiB) "
             f"vs `openssl speed -evp aes-256-gcm -bytes N` on the same machine; goal >= {GOAL_RAW} of OpenSSL on large buffers.", "",
             "| buffer | medsec MB/s | OpenSSL MB/s | ratio |", "|---|---:|---:|---:|"]
    for r in raw:
        large = r["bytes"] >= 16384
        cell = ratio_cell(r["ratio"], GOAL_RAW, True) if large else (f"{r['ratio']:.2f}" if r["ratio"] else "-")
        lines.append(f"| {r['buffer']} | {r['medsec_MBps']:.0f} | {r['openssl_MBps'] and round(r['openssl_MBps'])} | {cell} |")
    lines += ["", "Small buffers pay Python's per-call cost (nonce, object allocation) that `openssl speed` "
              "does not; the 28x28 row is the one a MedMNIST record actually costs.", "",
              "**Per-record cost of the encrypted store** (encode + seal + write; pread + unseal + decode), "
              f"{args.records} records each:", "", "| record | encrypt us/record | decrypt us/record | bytes added per record |",
              "|---|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['record']} | {r['encrypt_us']:.1f} | {r['decrypt_us']:.1f} | {r['envelope_overhead_B']} |")
    lines += ["", "**Training epoch time, `crypto=aes` vs plaintext** (PneumoniaMNIST, `model=small_cnn` width 32 "
              "with augmentation: a fast model, so the data pipeline weighs as much as it can; "
              "same seed and data, 20 training batches of 128 per epoch, median of epochs 2-3 over "
              f"{args.reps} interleaved repetitions; goal ratio <= {GOAL_EPOCH}):", "",
              "| in-memory cache | plaintext s/epoch | crypto=aes s/epoch | ratio |", "|---|---:|---:|---:|"]
    for r in epochs:
        how = "on (decrypted once, in memory)" if r["cache"] else "off (decrypted per item in 2 workers)"
        lines.append(f"| {how} | {r['plain_s']:.2f} | {r['aes_s']:.2f} | {ratio_cell(r['ratio'], GOAL_EPOCH, False)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="a short smoke run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each epoch-time run")
    parser.add_argument("--records", type=int, default=2000)
    args = parse_args(parser, argv, quick={"reps": 1, "records": 200})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key_file = write_key_file(work / "bench.key", SecretKey.generate())
        key_ref = KeyRef(file=str(key_file))
        os.environ["MEDSEC_KEY_FILE"], os.environ["MEDSEC_STORE_DIR"] = str(key_file), str(work / "stores")
        raw = bench_raw(0.3 if args.quick else 2.0)
        records = bench_records(key_ref, work, args.records)
        api.run("encrypt", ["data=medmnist"], work / "encrypt")  # the store of `crypto=aes` (key and store from the environment)
        epochs = bench_epochs(work, args.quick, args.reps)
    markdown = render(raw, records, epochs, args)
    publish(args.output, SECTION, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
