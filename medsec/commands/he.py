"""`medsec he ckpt_path=... [scheme=ckks|bfv] mode=throughput|latency [remote=URL]`: homomorphic inference.

The client (this process) creates the scheme's context and keeps its secret key; the server (in
this process, or ``medsec serve`` at ``remote``) gets the public context and ciphertexts only.
Writes ``he_report.json`` (plaintext vs encrypted accuracy and AUROC, argmax agreement, logit
error against the network and against the compiled program — the quantised one for BFV, which
the encrypted logits must equal exactly —, timings, sizes, peak memory) and ``plots/he_logits.png``.
"""
from __future__ import annotations

import functools
import logging
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from medsec.core.app import hydra_app
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.he.remote import RemoteServer
from medsec.he.schemes import get_scheme
from medsec.utils.run import to_float
from medsec.viz.plots import png_bytes

log = logging.getLogger("medsec.he")
Answer = Callable[[Sequence[bytes]], list[bytes]]


def scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float | None]:
    """Accuracy and macro AUROC, as ``medsec eval`` computes them."""
    return {"acc": to_float(multiclass_accuracy(logits, labels, num_classes, average="micro")),
            "auroc": to_float(multiclass_auroc(logits.softmax(-1), labels, num_classes))}


def run_encrypted(client: Any, answer: Answer, images: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Encrypt, evaluate and decrypt ``images`` batch by batch; logits and cost figures."""
    logits, cost = [], {"encrypt_s": 0.0, "server_s": 0.0, "decrypt_s": 0.0, "upload_bytes": 0, "download_bytes": 0}
    for part in client.batches(len(images)):
        start = time.perf_counter()
        blobs = client.encrypt(images[part])
        encrypted = time.perf_counter()
        result = answer(blobs)
        answered = time.perf_counter()
        logits.append(client.decrypt(result, len(images[part])))
        cost["encrypt_s"] += encrypted - start
        cost["server_s"] += answered - encrypted
        cost["decrypt_s"] += time.perf_counter() - answered
        cost["upload_bytes"] += sum(map(len, blobs))
        cost["download_bytes"] += sum(map(len, result))
    return np.concatenate(logits), cost


def plot_logits(plain: np.ndarray, encrypted: np.ndarray, title: str) -> plt.Figure:
    """Encrypted against plaintext logits, one colour per class."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k in range(plain.shape[1]):
        ax.scatter(plain[:, k], encrypted[:, k], s=6, label=f"logit {k}")
    low, high = float(plain.min()), float(plain.max())
    ax.plot([low, high], [low, high], "k--", lw=0.8)
    ax.set(xlabel="plaintext logit (PyTorch)", ylabel="decrypted logit", title=title)
    ax.legend()
    return fig


def homomorphic(cfg: DictConfig) -> dict[str, Any]:
    """Run the client -> server -> client flow on the test split; returns ``he_report.json``."""
    if cfg.scheme == "paillier":
        return paillier_inference(cfg)
    scheme = get_scheme(cfg.scheme, **(cfg.get(cfg.scheme) or {}))
    if cfg.mode not in scheme.modes:
        raise ConfigError(f"mode must be one of {list(scheme.modes)}, got {cfg.mode!r}")
    run = Run.open(cfg)
    net = run.task.net.eval()
    images, labels = run.images("test", cfg.max_images or 10**9)
    calibration, _ = run.images("train", cfg.calibration_images)
    program = scheme.compile(net, calibration)
    with torch.no_grad():
        plain = net(images).double().numpy()
    compiled = program.forward(images.double().numpy().reshape(len(images), -1))

    if cfg.remote:
        if cfg.scheme != "ckks":
            raise ConfigError(f"remote: `medsec serve` speaks CKKS; run scheme={cfg.scheme} without remote")
        server = RemoteServer(cfg.remote, ca_file=cfg.get("remote_ca_file"),
                              token_file=cfg.get("remote_token_file"))
        card = server.card()
        client = scheme.client(card, cfg.mode)
        server.upload_context(client.public_context())
        answer: Answer = functools.partial(server.evaluate, cfg.mode)
        server_has_secret = None  # not observable from here; the service refuses secret keys
    else:
        card = program.card(cfg.precision_bits)
        client = scheme.client(card, cfg.mode)
        local = scheme.server(program, client.public_context())
        answer = functools.partial(local.evaluate, cfg.mode)
        server_has_secret = local.has_secret_key()
    start = time.perf_counter()
    encrypted, cost = run_encrypted(client, answer, images.numpy())
    total_s = time.perf_counter() - start

    n, classes = len(images), program.num_classes
    report = {
        "checkpoint": str(cfg.ckpt_path), "scheme": cfg.scheme, "mode": cfg.mode, "remote": cfg.remote, "images": n,
        "params": client.params.to_dict(), "max_abs_calibration": program.max_abs,
        "plaintext": scores(torch.from_numpy(plain), labels, classes),
        "compiled": scores(torch.from_numpy(compiled), labels, classes),
        "encrypted": scores(torch.from_numpy(encrypted), labels, classes),
        "argmax_agreement": float((plain.argmax(1) == encrypted.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(plain - encrypted).max()),
        "max_abs_error_vs_compiled": float(np.abs(compiled - encrypted).max()),
        "ms_per_image": 1000 * total_s / n,
        "ms_per_image_server": 1000 * cost["server_s"] / n,
        "ms_per_image_encrypt": 1000 * cost["encrypt_s"] / n,
        "ms_per_image_decrypt": 1000 * cost["decrypt_s"] / n,
        "ciphertext_bytes_per_image": cost["upload_bytes"] / n,
        "result_bytes_per_image": cost["download_bytes"] / n,
        "public_context_bytes": len(client.public_context()),
        "server_context_has_secret_key": server_has_secret,
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return write_report(run, report, plain, encrypted, f"{cfg.scheme.upper()} {cfg.mode}, {n} images")


def paillier_inference(cfg: DictConfig) -> dict[str, Any]:
    """``scheme=paillier``: the client runs the backbone on the test images and encrypts the
    features under its own Paillier key; the server evaluates the linear head on them
    (:func:`medsec.he.paillier.paillier_probe`)."""
    from medsec.he.paillier import paillier_probe  # python-paillier and gmpy2 load with this scheme only

    if cfg.remote:
        raise ConfigError("remote: `medsec serve` speaks CKKS; run scheme=paillier without remote")
    run = Run.open(cfg)
    net = run.task.net.eval()
    images, labels = run.images("test", cfg.max_images or 10**9)
    with torch.no_grad():
        plain = net(images).double().numpy()
    encrypted, probe = paillier_probe(net, images, **cfg.paillier)
    classes = plain.shape[1]
    report = {"checkpoint": str(cfg.ckpt_path), "scheme": "paillier", "mode": "linear probe",
              "plaintext": scores(torch.from_numpy(plain), labels, classes),
              "encrypted": scores(torch.from_numpy(encrypted), labels, classes),
              "argmax_agreement": float((plain.argmax(1) == encrypted.argmax(1)).mean()),
              "max_abs_logit_error": float(np.abs(plain - encrypted).max()),
              "ms_per_image": sum(probe[f"{step}_ms_per_image"] for step in ("features", "encrypt", "server", "decrypt")),
              **probe}
    return write_report(run, report, plain, encrypted, f"Paillier linear head, {len(images)} images")


def write_report(run: Run, report: dict[str, Any], plain: np.ndarray, encrypted: np.ndarray, title: str) -> dict[str, Any]:
    """``he_report.json`` and ``plots/he_logits.png`` (sealed with ``encrypt_outputs``); logs the headline."""
    run.writer.write_json("he_report.json", report)
    run.writer.write("plots/he_logits.png", png_bytes(plot_logits(plain, encrypted, title)))
    log.info("%s %s: plaintext acc %.4f, encrypted acc %.4f, agreement %.4f, max logit error %.2e, %.1f ms/image",
             report["scheme"], report["mode"], report["plaintext"]["acc"], report["encrypted"]["acc"],
             report["argmax_agreement"], report["max_abs_logit_error"], report["ms_per_image"])
    log.info("results in %s", run.out_dir)
    return report


main = hydra_app("he", homomorphic)

if __name__ == "__main__":
    main()
