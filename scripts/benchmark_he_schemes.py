#!/usr/bin/env python
"""Privacy-preserving inference schemes side by side on one model and one test set; writes the
``he_schemes`` section of BENCHMARKS.md.

Models: ``experiment=pneumoniamnist_he_cnn`` (conv -> square -> linear -> square -> linear) and the
deeper ``experiment=pneumoniamnist_he_cnn_deep``; data: PneumoniaMNIST's 624 test images. Schemes and
layouts:

- CKKS (TenSEAL), ``throughput`` (one SIMD slot per image) and ``latency`` (one image per
  ciphertext, on the first ``--latency-images``): ``medsec he``; both models.
- BFV (TenSEAL), the he_cnn quantised to 8-bit pixels and 6-bit weights, evaluated exactly: ``medsec
  he scheme=bfv``, throughput on all images, latency on the first ``--bfv-latency-images``.
- Paillier (python-paillier + gmpy2): the he_cnn's linear head on encrypted features the client
  computes, on the first ``--paillier-images``: ``medsec he scheme=paillier``.
- Two-party additive secret sharing (``medsec.mpc.secret_sharing``), in Z_2^64 with truncation and
  in an exact residue number system: two server processes on loopback; ``batch`` (all images in one
  request) and ``latency`` (one image per request).

    python scripts/benchmark_he_schemes.py                       # about 5 minutes on 2 cores
    python scripts/benchmark_he_schemes.py --ckpt best.ckpt --deep-ckpt deep.ckpt --output /tmp/B.md
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsec import api
from medsec.commands.he import scores
from medsec.core.run import Run
from medsec.he.compiler import compile_model
from medsec.he.testing import free_port
from medsec.mpc.arithmetic import RNS, Arithmetic, Ring64
from medsec.mpc.secret_sharing import Program, SecretSharedInference, two_servers
from medsec.utils.benchmarks import benchmark_parser, fmt, machine_summary, mark, produced_by, publish
from medsec.utils.config import compose_config

SECTION = "he_schemes"
GOAL_SS_MS = 50.0
GOAL_DEEP_AUROC, GOAL_DEEP_LATENCY_MS, GOAL_DEEP_AMORTISED_MS = 0.95, 1500.0, 20.0
CALIBRATION_IMAGES = 256
KEYS = {
    "ckks": ("the client: secret key; the server: public, relinearisation and Galois keys",
             "nothing of the image (RLWE ciphertexts); it holds the model"),
    "bfv": (("the client: a secret key per plain prime; the server: relinearisation keys (latency: Galois keys for "
             "the layers' rotations only)"), "nothing of the image; it holds the quantised model"),
    "paillier": ("the client: the key pair (it runs the backbone itself); the server: the public modulus",
                 "nothing of the features but their number; it holds the linear head in the clear"),
    "secret sharing": (("no keys; each server holds one uniform share; the dealer (here the client) makes the "
                       "Beaver pairs"), ("nothing, unless the two servers collude (together they read the image); "
                       "both hold the model")),
}


def he_row(ckpt: Path, model: str, scheme: str, mode: str, work: Path, max_images: int | None) -> dict[str, Any]:
    """One ``medsec he`` run as a table row; throughput's amortised cost is the batch's over every slot
    (Paillier has one layout, ``linear probe``)."""
    overrides = [f"ckpt_path={ckpt}", f"scheme={scheme}", *([f"max_images={max_images}"] if max_images else [])]
    report = api.run("he", [*overrides, *([] if scheme == "paillier" else [f"mode={mode}"])],
                     work / f"{model}_{scheme}_{mode.replace(' ', '_')}")
    slots = report["params"]["slots"] if mode == "throughput" else report["images"]
    size = report.get("ciphertext_bytes_per_image", report.get("request_bytes_per_image", 0)) + \
        report.get("result_bytes_per_image", report.get("response_bytes_per_image", 0))
    return {"scheme": scheme, "model": model, "layout": mode, "images": report["images"], "scores": report["encrypted"],
            "agreement": report["argmax_agreement"], "max_error": report["max_abs_logit_error"],
            "ms": report["ms_per_image"], "amortised": report["ms_per_image"] * report["images"] / slots,
            "bytes": size, "report": report}


def shared_rows(program: Program, arithmetic: Arithmetic, x: np.ndarray, labels: torch.Tensor,
                plain: np.ndarray) -> list[dict[str, Any]]:
    """Both layouts (all images in one request, one image per request) through two server
    processes on loopback."""
    rows, ports = [], [free_port() for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp, two_servers(program, arithmetic, Path(tmp), ports):
        client = SecretSharedInference(program, arithmetic, ports[:2], seed=0)
        for layout, batch in (("batch", len(x)), ("latency", 1)):
            sent, start = client.bytes_sent, time.perf_counter()
            logits = np.concatenate([client.logits(x[i:i + batch]) for i in range(0, len(x), batch)])
            ms = 1000 * (time.perf_counter() - start) / len(x)
            rows.append({"scheme": f"secret sharing, {arithmetic.name}", "model": "he_cnn", "layout": layout,
                         "images": len(x), "scores": scores(torch.from_numpy(logits), labels, program.num_classes),
                         "agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
                         "max_error": float(np.abs(logits - plain).max()), "ms": ms, "amortised": ms,
                         "bytes": (client.bytes_sent - sent) / len(x), "logits": logits})
        client.close()
    return rows


def secret_sharing_rows(ckpt: Path, work: Path, exact_images: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Z_2^64 and RNS, both layouts, on the test images; the RNS logits against the quantised model
    evaluated in Python integers on the first ``exact_images``."""
    cfg = compose_config("he", [f"ckpt_path={ckpt}"], output_dir=work / "ss")
    run = Run.open(cfg)
    net = run.task.net.eval()
    images, labels = run.images("test", 10**9)
    calibration, _ = run.images("train", CALIBRATION_IMAGES)
    program = Program.of(compile_model(net, calibration))
    with torch.no_grad():
        plain = net(images).double().numpy()
    x = images.numpy()
    ring, rns = Ring64.plan(program), RNS.plan(program)
    rows = [*shared_rows(program, ring, x, labels, plain), *shared_rows(program, rns, x, labels, plain)]
    flat = x.reshape(len(x), -1).astype(np.float64)
    exact = rns.reference(program, flat[:exact_images])
    extra = {"plaintext": scores(torch.from_numpy(plain), labels, program.num_classes), "max_abs": program.max_abs,
             "frac_bits": ring.frac_bits, "rns": rns, "exact_images": exact_images,
             "rns_exact": all(np.array_equal(r["logits"][:exact_images], exact) for r in rows if "rns" in r["scheme"]),
             "bound": float(ring.error_bound(program, flat).max())}
    return rows, extra


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [("| scheme | model | layout | images | acc / AUROC | argmax agreement % | max logit error | ms/image | "
              "ms/image amortised | KiB/image |"), "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['model']} | {r['layout']} | {r['images']} | {fmt(r['scores']['acc'])} / "
                     f"{fmt(r['scores']['auroc'])} | {100 * r['agreement']:.2f} | {r['max_error']:.1e} | {r['ms']:.2f} | "
                     f"{r['amortised']:.2f} | {r['bytes'] / 1024:.1f} |")
    return lines


def render(rows: list[dict[str, Any]], extra: dict[str, Any], args: argparse.Namespace, started: Any) -> str:
    plain = extra["plaintext"]
    pick = {(r["scheme"], r["model"], r["layout"]): r for r in rows}
    bfv, deep = pick["bfv", "he_cnn", "throughput"]["report"], pick["ckks", "he_cnn_deep", "throughput"]
    deep_latency = pick["ckks", "he_cnn_deep", "latency"]
    paillier = pick["paillier", "he_cnn", "linear probe"]["report"]
    lines = ["## Privacy-preserving inference schemes side by side (CKKS, BFV, Paillier, secret sharing)", "",
             f"{produced_by('benchmark_he_schemes.py', started)}. Machine: {machine_summary()}.", "",
             ("Models: `experiment=pneumoniamnist_he_cnn` (he_cnn: conv 4x7x7 stride 3 -> square -> linear 256->32 -> "
              f"square -> linear 32->2; plaintext test acc {fmt(plain['acc'])}, AUROC {fmt(plain['auroc'])}) and "
              f"`experiment=pneumoniamnist_he_cnn_deep` (he_cnn_deep: {extra['deep_summary']}; plaintext test AUROC "
              f"{fmt(deep['report']['plaintext']['auroc'])}); PneumoniaMNIST test images (CKKS latency: the first "
              f"{args.latency_images}; BFV latency: the first {args.bfv_latency_images}; Paillier: the first "
              f"{args.paillier_images}). ms/image: end to end at the client, all work included (encryption or "
              "sharing, the server(s), decryption; Paillier: the client's backbone too); amortised: a throughput "
              "batch's time spread over every slot it holds (it costs the same full or not). Bytes: sent and received "
              "by the client per image. Agreement and error: against the float network."), "",
             *table(rows), "",
             "| scheme | keys, and who holds them | what a server learns |", "|---|---|---|",
             *[f"| {name} | {keys} | {learns} |" for name, (keys, learns) in KEYS.items()], ""]
    ring = {r["layout"]: r for r in rows if r["scheme"] == "secret sharing, ring64"}
    rns = extra["rns"]
    params = bfv["params"]
    lines += [(f"BFV: pixels as 8-bit integers and each layer's weights as 6-bit integers; nothing is rounded after "
               f"that, so the logits are exact integers (worst case over all inputs in [0, 1]: {params['plain_bits'] - 1} "
               f"bits, held by {len(params['plain_moduli'])} plain primes, N={params['poly_modulus_degree']}). The "
               f"decrypted logits equal the quantised model's: max difference {bfv['max_abs_error_vs_compiled']:.1e} "
               f"over {bfv['images']} images (the tests check the integers themselves); quantised test acc "
               f"{fmt(bfv['compiled']['acc'])} against the float he_cnn's {fmt(bfv['plaintext']['acc'])}."),
              "",
              (f"Paillier ({paillier['key_bits']}-bit key, {paillier['frac_bits']} fractional bits, gmpy2 "
               f"{paillier['gmpy2']}): the client runs the he_cnn up to its head ({paillier['features']} features) and "
               f"encrypts them; the server computes the {paillier['classes']} logits and packs them "
               f"({paillier['logits_per_ciphertext']} per ciphertext). Per image: encryption "
               f"{paillier['encrypt_ms_per_image']:.0f} ms, server {paillier['server_ms_per_image']:.0f} ms, decryption "
               f"{paillier['decrypt_ms_per_image']:.0f} ms; error {paillier['max_abs_error']:.1e} within its stated bound "
               f"({paillier['max_error_bound']:.1e}): {paillier['within_bound']}."), "",
              (f"Secret sharing in Z_2^64 (`ring64`): fixed point with {extra['frac_bits']} fractional bits, the "
               f"planner's choice for calibrated values up to {extra['max_abs']:.3g} (the squares' outputs), so that a "
               "local truncation fails with probability at most 2^-30 per value; its logit error is that fixed point's "
               "rounding carried through the layers (the worst-case interval bound for these images, "
               f"{extra['bound']:.1e}, is loose). In the residue number system (`rns`): {rns.words} primes below 2^21 "
               f"(M about 2^{rns.modulus.bit_length()}), {rns.frac_bits} fractional bits and no truncation: the "
               f"servers compute the quantised model exactly (equal, bit for bit, to the quantised model evaluated in "
               f"Python integers on the first {extra['exact_images']} images: {extra['rns_exact']}), at "
               f"{rns.words} words per value on the wire."), "",
              "Goals:",
              (f"- BFV: argmax agreement with the quantised model 100%: "
               f"{100 * float(bfv['max_abs_error_vs_compiled'] == 0.0):.0f}% (logits equal) — "
               f"{mark(bfv['max_abs_error_vs_compiled'] == 0.0)}; accuracy within 1 point of the float he_cnn: "
               f"{fmt(bfv['encrypted']['acc'])} vs {fmt(bfv['plaintext']['acc'])} — "
               f"{mark(abs(bfv['encrypted']['acc'] - bfv['plaintext']['acc']) <= 0.01)}"),
              (f"- secret-shared inference under {GOAL_SS_MS:g} ms per image on loopback (one image per request, "
               f"Z_2^64): {ring['latency']['ms']:.2f} ms — {mark(ring['latency']['ms'] < GOAL_SS_MS)}"),
              "- Paillier: reported as it is (above).",
              (f"- deeper CKKS network: encrypted test AUROC >= {GOAL_DEEP_AUROC}: {fmt(deep['scores']['auroc'])} — "
               f"{mark(deep['scores']['auroc'] >= GOAL_DEEP_AUROC)}; latency <= {GOAL_DEEP_LATENCY_MS / 1000:g} s/image: "
               f"{deep_latency['ms'] / 1000:.2f} s — {mark(deep_latency['ms'] <= GOAL_DEEP_LATENCY_MS)}; amortised <= "
               f"{GOAL_DEEP_AMORTISED_MS:g} ms/image: {deep['amortised']:.1f} ms — "
               f"{mark(deep['amortised'] <= GOAL_DEEP_AMORTISED_MS)}"), "",
              ("Anchor: CryptoNets (an integer leveled scheme, like the BFV rows) about 51,000 predictions/hour; here "
               f"BFV throughput {3.6e6 / pick['bfv', 'he_cnn', 'throughput']['amortised']:,.0f} and CKKS he_cnn "
               f"{3.6e6 / pick['ckks', 'he_cnn', 'throughput']['amortised']:,.0f} predictions/hour at full slots.")]
    return "\n".join(lines)


def trained(experiment: str, ckpt: Path | None, work: Path) -> Path:
    """``ckpt``, or the best checkpoint of a fresh ``experiment`` run."""
    if ckpt is not None:
        return ckpt
    api.run("train", [f"experiment={experiment}", "callbacks.rich_progress_bar=null"], work / experiment)
    return work / experiment / "checkpoints" / "best.ckpt"


def main(argv: list[str] | None = None) -> int:
    import datetime as dt

    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument("--bfv-latency-images", type=int, default=3)
    parser.add_argument("--paillier-images", type=int, default=64)
    parser.add_argument("--exact-images", type=int, default=32, help="RNS against the quantised model in Python ints")
    parser.add_argument("--ckpt", type=Path, default=None, help="skip training the he_cnn and use this checkpoint")
    parser.add_argument("--deep-ckpt", type=Path, default=None, help="skip training the he_cnn_deep")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="medsec_he_schemes_"))
    ckpt = trained("pneumoniamnist_he_cnn", args.ckpt, work)
    deep = trained("pneumoniamnist_he_cnn_deep", args.deep_ckpt, work)
    rows = [he_row(ckpt, "he_cnn", "ckks", "throughput", work, None),
            he_row(ckpt, "he_cnn", "ckks", "latency", work, args.latency_images),
            he_row(deep, "he_cnn_deep", "ckks", "throughput", work, None),
            he_row(deep, "he_cnn_deep", "ckks", "latency", work, args.latency_images),
            he_row(ckpt, "he_cnn", "bfv", "throughput", work, None),
            he_row(ckpt, "he_cnn", "bfv", "latency", work, args.bfv_latency_images),
            he_row(ckpt, "he_cnn", "paillier", "linear probe", work, args.paillier_images)]
    ss_rows, extra = secret_sharing_rows(ckpt, work, args.exact_images)
    extra["deep_summary"] = deep_summary(deep)
    publish(args.output, SECTION, render([*rows, *ss_rows], extra, args, started))
    return 0


def deep_summary(ckpt: Path) -> str:
    """The deep network's layers as the HE compiler sees them."""
    cfg = compose_config("he", [f"ckpt_path={ckpt}"])
    net = Run.open(cfg, read_data=False).task.net
    return " -> ".join(type(m).__name__.lower() for m in [*net.backbone.children(), net.head]
                       if not isinstance(m, torch.nn.Flatten))


if __name__ == "__main__":
    raise SystemExit(main())
