"""The cryptographic security report of an image cipher: entropy, NPCR/UACI against their critical
values, correlations, histogram chi-square, key and plaintext sensitivity, a NIST SP 800-22 subset,
decryption quality and robustness, each with pass/fail over many images."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsec.analysis.ciphers import statistics as M
from medsec.analysis.ciphers.classical import Ciphertext, ImageCipher
from medsec.analysis.ciphers.randomness import ALPHA as NIST_ALPHA
from medsec.analysis.ciphers.randomness import run_tests, to_bits
from medsec.data.datamodule import build_datamodule
from medsec.errors import ConfigError
from medsec.protections.keys import KeyRef, SecretKey
from medsec.utils.run import to_float

STAGES = {"train": "fit", "val": "validate", "test": "test"}


# ---- inputs -------------------------------------------------------------------------------
def load_images(data_cfg: Any, split: str = "test", count: int = 64) -> np.ndarray:
    """The first ``count`` images of ``split`` as 8-bit grey ``(N, H, W)``, through the data
    module's own pipeline (scaled to [0, 1], resized as the data config says)."""
    if split not in STAGES:
        raise ConfigError(f"split must be one of {list(STAGES)}, got '{split}'")
    datamodule = build_datamodule(data_cfg)
    if datamodule.in_channels != 1:
        raise ConfigError("data.in_channels: the ciphers work on grey images; use data.in_channels=1")
    datamodule.setup(STAGES[split])
    dataset = datamodule.datasets[split]
    images = [np.asarray(dataset[i]["image"])[0] for i in range(min(count, len(dataset)))]
    return np.round(np.clip(np.stack(images), 0, 1) * 255).astype(np.uint8)


def master_key(key_cfg: Mapping[str, Any] | None) -> SecretKey:
    """The key the report derives every cipher key from: ``key`` (a reference) or an ephemeral one."""
    return SecretKey.generate() if not key_cfg else KeyRef.from_config(key_cfg, field="key").load()


# ---- tests --------------------------------------------------------------------------------
def summarise(values: np.ndarray, passes: np.ndarray, alpha: float, **extra: Any) -> dict[str, Any]:
    """Mean of per-image ``values`` and the proportion test over per-image ``passes``."""
    finite = np.asarray(values, dtype=np.float64)
    return {"value": to_float(np.nanmean(finite)) if np.isfinite(finite).any() else None,
            **extra, **M.proportion_test(passes, alpha).as_dict()}


def histogram_tests(cipher_images: np.ndarray, alpha: float) -> dict[str, dict[str, Any]]:
    pixels = cipher_images[0].size
    entropy, chi2 = M.entropy(cipher_images), M.chi_square(cipher_images)
    threshold, critical = M.entropy_threshold(pixels, alpha), M.chi_square_critical(alpha)
    return {
        "entropy": summarise(entropy, entropy >= threshold, alpha, ideal=8.0, threshold=threshold,
                             criterion=f"entropy >= {threshold:.4f} bits ({alpha:g} quantile of uniform images)"),
        "chi_square": summarise(chi2, chi2 <= critical, alpha, ideal=float(M.F), threshold=critical,
                                criterion=f"chi-square <= {critical:.2f} (uniform histogram, 255 d.o.f.)"),
    }


def correlation_tests(plain: np.ndarray, cipher_images: np.ndarray, alpha: float) -> dict[str, dict[str, Any]]:
    height, width = cipher_images.shape[1:]
    tests = {}
    for direction in M.DIRECTIONS:
        r = M.correlation(cipher_images, direction)
        limit = M.correlation_threshold(height, width, direction, alpha)
        tests[f"correlation_{direction}"] = summarise(
            r, np.abs(np.nan_to_num(r, nan=1.0)) <= limit, alpha, ideal=0.0, threshold=limit,
            plain=to_float(np.nanmean(M.correlation(plain, direction))),
            criterion=f"|r| <= {limit:.4f} (no correlation at alpha)")
    return tests


def differential(first: np.ndarray, second: np.ndarray, alpha: float, what: str) -> dict[str, dict[str, Any]]:
    """NPCR and UACI of two cipher-image stacks against the Wu-Noonan-Agaian critical values."""
    crit = M.critical_values(*first.shape[1:], alpha=alpha)
    npcr, uaci = M.npcr(first, second), M.uaci(first, second)
    return {
        f"{what}_npcr": summarise(npcr, crit.npcr_passes(npcr), alpha, ideal=M.NPCR_IDEAL, threshold=crit.npcr,
                                  criterion=f"NPCR >= {crit.npcr:.4f} %"),
        f"{what}_uaci": summarise(uaci, crit.uaci_passes(uaci), alpha, ideal=M.UACI_IDEAL,
                                  threshold=[crit.uaci_low, crit.uaci_high],
                                  criterion=f"{crit.uaci_low:.4f} % <= UACI <= {crit.uaci_high:.4f} %"),
    }


def one_pixel_changed(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``images`` with the lowest bit of one random pixel per image flipped."""
    changed = images.copy()
    rows, cols = rng.integers(images.shape[1], size=len(images)), rng.integers(images.shape[2], size=len(images))
    changed[np.arange(len(images)), rows, cols] ^= 1
    return changed


def plaintext_sensitivity(cipher: ImageCipher, images: np.ndarray, ct: Ciphertext, key: bytes,
                          rng: np.random.Generator, alpha: float) -> dict[str, dict[str, Any]]:
    """Differential attack: encrypt each image with one pixel changed (fresh nonces, as the cipher
    is used) and compare the cipher images."""
    return differential(ct.images, cipher.encrypt(one_pixel_changed(images, rng), key).images, alpha, "plaintext")


def key_sensitivity(cipher: ImageCipher, images: np.ndarray, ct: Ciphertext, key: bytes,
                    rng: np.random.Generator, alpha: float) -> dict[str, dict[str, Any]]:
    """Encrypt the same images (same nonces) under the key with one random bit flipped, and decrypt
    the original cipher images with that key."""
    flipped = cipher.flip_key_bit(key, int(rng.integers(8 * len(key))))
    tests = differential(ct.images, cipher.encrypt(images, flipped, ct.nonces).images, alpha, "key")
    wrong = M.psnr(images, cipher.decrypt(ct, flipped))
    tests["key_npcr"]["wrong_key_decryption_psnr_db"] = to_float(np.mean(wrong))
    return tests


def nist_tests(cipher: ImageCipher, shape: tuple[int, int], keys: list[bytes], alpha: float) -> dict[str, dict[str, Any]]:
    """SP 800-22 tests on keystreams: the cipher images of an all-black image, one per key."""
    black = np.zeros((1, *shape), dtype=np.uint8)
    p_values = [run_tests(to_bits(cipher.encrypt(black, key).images)) for key in keys]
    tests = {}
    for name in p_values[0]:
        p = np.asarray([row[name] for row in p_values])
        tests[f"nist_{name}"] = summarise(p, p >= alpha, alpha, ideal=None, threshold=alpha,
                                          criterion=f"P-value >= {alpha}", bits_per_sequence=shape[0] * shape[1] * 8)
    return tests


def decryption_quality(plain: np.ndarray, decrypted: np.ndarray, min_psnr: float) -> dict[str, dict[str, Any]]:
    """Decryption PSNR (a test: every image at ``min_psnr`` dB or better) and SSIM (informational)."""
    psnr = M.psnr(plain, decrypted)
    return {
        "decryption_psnr": {**summarise(np.where(np.isinf(psnr), np.nan, psnr), psnr >= min_psnr, 0.0,
                                        threshold=min_psnr, criterion=f"every image decrypts with PSNR >= {min_psnr} dB"),
                            "exact": bool((plain == decrypted).all())},
        "decryption_ssim": {"value": to_float(M.ssim(plain, decrypted).mean()), "ideal": 1.0, "passed": None,
                            "criterion": "informational"},
    }


def robustness(cipher: ImageCipher, plain: np.ndarray, ct: Ciphertext, key: bytes, noise_sigma: list[float],
               crop_fraction: list[float], rng: np.random.Generator) -> dict[str, dict[str, float | None]]:
    """Mean decryption PSNR after Gaussian noise on the cipher images (sigma in grey levels) and
    after zeroing a central square covering ``fraction`` of each cipher image."""
    def decrypt_damaged(images: np.ndarray) -> float | None:
        damaged = Ciphertext(images.astype(np.uint8), ct.nonces)
        return to_float(np.mean(np.minimum(M.psnr(plain, cipher.decrypt(damaged, key)), 100.0)))

    noisy = {f"sigma_{s:g}": decrypt_damaged(np.clip(np.round(ct.images + rng.normal(0, s, ct.images.shape)), 0, 255))
             for s in noise_sigma}
    height, width = ct.images.shape[1:]
    cropped = {}
    for fraction in crop_fraction:
        side_h, side_w = int(round(height * fraction**0.5)), int(round(width * fraction**0.5))
        top, left = (height - side_h) // 2, (width - side_w) // 2
        images = ct.images.copy()
        images[:, top:top + side_h, left:left + side_w] = 0
        cropped[f"fraction_{fraction:g}"] = decrypt_damaged(images)
    return {"noise_psnr_db": noisy, "crop_psnr_db": cropped}


def timed(func: Callable[[], Any], count: int) -> tuple[Any, float]:
    """``func()`` and its wall time in milliseconds per image."""
    start = time.perf_counter()
    result = func()
    return result, 1000 * (time.perf_counter() - start) / max(count, 1)


def security_report(cipher: ImageCipher, images: np.ndarray, secret: SecretKey, *, alpha: float = 0.05,
                    nist_alpha: float = NIST_ALPHA, nist_sequences: int = 32, decryption_psnr_min: float = 40.0,
                    noise_sigma: tuple[float, ...] = (2.0, 8.0), crop_fraction: tuple[float, ...] = (0.0625, 0.25),
                    seed: int = 0) -> tuple[dict[str, Any], Ciphertext]:
    """Every test of the report on ``images`` (8-bit ``(N, H, W)``), keys derived from ``secret``;
    returns the report and the cipher images (for plots)."""
    images = M.as_stack(images)
    if len(images) < 2:
        raise ConfigError("num_images: the report needs at least 2 images")
    rng = np.random.default_rng(seed)
    key = secret.derive(f"report/{cipher.name}", cipher.key_bytes)
    ct, encrypt_ms = timed(lambda: cipher.encrypt(images, key), len(images))
    decrypted, decrypt_ms = timed(lambda: cipher.decrypt(ct, key), len(images))
    sequence_keys = [secret.derive(f"report/{cipher.name}/sequence-{i}", cipher.key_bytes) for i in range(nist_sequences)]
    tests = {
        **histogram_tests(ct.images, alpha),
        **correlation_tests(images, ct.images, alpha),
        **plaintext_sensitivity(cipher, images, ct, key, rng, alpha),
        **key_sensitivity(cipher, images, ct, key, rng, alpha),
        **nist_tests(cipher, images.shape[1:], sequence_keys, nist_alpha),
        **decryption_quality(images, decrypted, decryption_psnr_min),
    }
    counted = [name for name, test in tests.items() if test["passed"] is not None]
    failed = sorted(name for name in counted if not tests[name]["passed"])
    return {
        "cipher": cipher.name,
        "images": len(images),
        "image_shape": list(images.shape[1:]),
        "plain_entropy": to_float(M.entropy(images).mean()),
        "encrypt_ms_per_image": encrypt_ms,
        "decrypt_ms_per_image": decrypt_ms,
        "tests": tests,
        "robustness": robustness(cipher, images, ct, key, list(noise_sigma), list(crop_fraction), rng),
        "failed": failed,
        "passed_all": not failed,
        "summary": (f"{cipher.name} passes all {len(counted)} tests" if not failed else
                    f"{cipher.name} FAILS {len(failed)} of {len(counted)} tests: {', '.join(failed)}"),
        "notes": ("Nonce-based ciphers get a fresh nonce per encryption in the plaintext-sensitivity test "
                  "(as they are used) and the same nonce in the key-sensitivity test."),
    }, ct


def save_plots(plain: np.ndarray, cipher_images: np.ndarray, out_dir: Path, name: str) -> list[Path]:
    from medsec.viz.crypto import plot_adjacent_scatter, plot_histograms

    plots = out_dir / "plots"
    return [plot_histograms(plain, cipher_images, plots / "histograms.png", title=f"{name}: grey-level histograms"),
            plot_adjacent_scatter(plain[0], cipher_images[0], plots / "adjacent_scatter.png",
                                  title=f"{name}: adjacent pixels")]
