"""`medsec report cipher=<aes_ctr|chaotic|deepkeygen|encipher_gan>`: a cryptographic security report.

Encrypts many test images and writes ``security_report.json`` (every test with its ideal value,
criterion and pass/fail, and the list of failed tests) plus histogram and adjacent-pixel plots.
Per-image tests run at ``alpha`` (NIST tests at ``nist_alpha``); a test passes when as many
images (keystreams) pass as an ideal cipher would give (:func:`medsec.analysis.ciphers.statistics.proportion_test`).
Learned ciphers take ``ckpt_path=...`` and, unless ``data=...`` says otherwise, the checkpoint's
data set. Keys come from ``key`` (a key reference) or are ephemeral; none is written anywhere.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medsec.analysis.ciphers.classical import ImageCipher
from medsec.analysis.ciphers.report import load_images, master_key, save_plots, security_report
from medsec.core.app import hydra_app
from medsec.core.checkpoint import CHECKPOINT_KEY, read_checkpoint
from medsec.core.registry import check_targets
from medsec.utils.config import CONFIG_DIR
from medsec.utils.outputs import OutputWriter
from medsec.utils.run import save_resolved_config

log = logging.getLogger("medsec.report")


def data_config(cfg: DictConfig) -> Any:
    """``cfg.data``, else the data set stored in ``ckpt_path`` (learned ciphers), else the built-in
    synthetic set (no download)."""
    if cfg.get("data"):
        return cfg.data
    if cfg.get("ckpt_path"):
        return OmegaConf.create(read_checkpoint(cfg.ckpt_path)[CHECKPOINT_KEY]["data"])
    log.info("data: the built-in synthetic set (choose another with data=...)")
    return OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml")


def report(cfg: DictConfig) -> dict[str, Any]:
    """Run the report ``cfg`` describes; returns what ``security_report.json`` holds."""
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    check_targets(cfg.cipher, "cipher", ("cipher",))
    cipher: ImageCipher = instantiate(cfg.cipher)
    images = load_images(data_config(cfg), cfg.split, cfg.num_images)
    log.info("%s: %d images %s", cipher.name, len(images), images.shape[1:])
    result, ct = security_report(cipher, images, master_key(cfg.get("key")), alpha=cfg.alpha,
                                 nist_alpha=cfg.nist_alpha, nist_sequences=cfg.nist_sequences,
                                 decryption_psnr_min=cfg.decryption_psnr_min, noise_sigma=cfg.robustness.noise_sigma,
                                 crop_fraction=cfg.robustness.crop_fraction, seed=cfg.seed)
    OutputWriter(out_dir).write_json("security_report.json", result)
    save_plots(images, ct.images, out_dir, cipher.name)
    (log.info if result["passed_all"] else log.warning)("%s", result["summary"])
    return result


main = hydra_app("report", report)

if __name__ == "__main__":
    main()
