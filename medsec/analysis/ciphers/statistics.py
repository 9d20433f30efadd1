"""Image-encryption quality metrics, each with the test that says what an ideal cipher would give.

Images are 8-bit grey arrays ``(H, W)`` or stacks ``(N, H, W)``; per-image functions return one
value per image. References: NPCR/UACI and their critical values from Wu, Noonan & Agaian (2011),
"NPCR and UACI randomness tests for image encryption"; the histogram tests are Pearson's
chi-square against the uniform histogram and the entropy's quantile under a uniform image.

Tests run per image (or per keystream) at a significance level ``alpha``; :func:`proportion_test`
then asks whether the share of passing images is what an ideal cipher would give.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

LEVELS = 256
F = LEVELS - 1
NPCR_IDEAL = 100.0 * F / (F + 1)
UACI_IDEAL = 100.0 * (F + 2) / (3 * F + 3)
DIRECTIONS = ("horizontal", "vertical", "diagonal")


def as_stack(images: np.ndarray) -> np.ndarray:
    """``images`` as a ``(N, H, W)`` uint8 stack (a single ``(H, W)`` image becomes N = 1)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected 8-bit images (uint8), got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) images, got shape {images.shape}")
    return images


def histograms(images: np.ndarray) -> np.ndarray:
    """Grey-level counts per image, ``(N, 256)``."""
    stack = as_stack(images)
    offsets = (np.arange(len(stack)) * LEVELS)[:, None]
    flat = (stack.reshape(len(stack), -1).astype(np.int64) + offsets).ravel()
    return np.bincount(flat, minlength=LEVELS * len(stack)).reshape(len(stack), LEVELS)


def entropy(images: np.ndarray) -> np.ndarray:
    """Shannon entropy of each image's grey-level histogram in bits (ideal: 8)."""
    return stats.entropy(histograms(images), base=2, axis=1)


@functools.lru_cache(maxsize=32)
def entropy_threshold(num_pixels: int, alpha: float = 0.05, draws: int = 20_000) -> float:
    """The entropy below which an image of ``num_pixels`` is not uniform at level ``alpha``.

    The ``alpha`` quantile of the entropy of ``draws`` images whose pixels are drawn uniformly
    (seeded, so reports are reproducible). The G-test's chi-square approximation,
    ``2 n ln 2 (8 - H) ~ chi2(255)``, is right for large images (256x256: H >= 7.9968) but rejects
    about 18 % of uniform 32x32 images at ``alpha = 0.05``, as each histogram bin expects only 4 pixels.
    """
    counts = np.random.default_rng(0).multinomial(num_pixels, np.full(LEVELS, 1 / LEVELS), size=draws)
    p = counts / num_pixels
    with np.errstate(divide="ignore", invalid="ignore"):
        entropies = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return float(np.quantile(entropies, alpha))


def chi_square(images: np.ndarray) -> np.ndarray:
    """Pearson's chi-square statistic of each histogram against the uniform one (255 d.o.f.)."""
    return stats.chisquare(histograms(images), axis=1).statistic


def chi_square_critical(alpha: float = 0.05) -> float:
    """Critical chi-square value for 255 degrees of freedom (293.2478 at alpha = 0.05)."""
    return float(stats.chi2.ppf(1 - alpha, F))


def npcr(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Number of pixels change rate in percent, per image pair (ideal 99.6094 %)."""
    a, b = as_stack(first), as_stack(second)
    return 100.0 * (a != b).reshape(len(a), -1).mean(1)


def uaci(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Unified average changing intensity in percent, per image pair (ideal 33.4635 %)."""
    a, b = as_stack(first).astype(np.int16), as_stack(second).astype(np.int16)
    return 100.0 * np.abs(a - b).reshape(len(a), -1).mean(1) / F


@dataclass(frozen=True)
class CriticalValues:
    """Wu-Noonan-Agaian critical values (percent) for one image size and significance level."""

    npcr: float
    uaci_low: float
    uaci_high: float

    def npcr_passes(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values) >= self.npcr

    def uaci_passes(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        return (values >= self.uaci_low) & (values <= self.uaci_high)


def critical_values(height: int, width: int, alpha: float = 0.05) -> CriticalValues:
    """NPCR and UACI critical values for ``height x width`` 8-bit cipher images.

    NPCR: ``N* = mu_N - z(1-alpha) sigma_N`` with ``mu_N = F/(F+1)``,
    ``sigma_N^2 = F / ((F+1)^2 MN)``. UACI: accepted inside ``mu_U -+ z(1-alpha/2) sigma_U`` with
    ``mu_U = (F+2)/(3F+3)``, ``sigma_U^2 = (F+2)(F^2+2F+3) / (18 (F+1)^2 MN F)``.
    """
    pixels = height * width
    mu_n, sigma_n = F / (F + 1), np.sqrt(F / ((F + 1) ** 2 * pixels))
    mu_u = (F + 2) / (3 * F + 3)
    sigma_u = np.sqrt((F + 2) * (F**2 + 2 * F + 3) / (18 * (F + 1) ** 2 * pixels * F))
    z_one, z_two = stats.norm.ppf(1 - alpha), stats.norm.ppf(1 - alpha / 2)
    return CriticalValues(npcr=100 * (mu_n - z_one * sigma_n), uaci_low=100 * (mu_u - z_two * sigma_u),
                          uaci_high=100 * (mu_u + z_two * sigma_u))


def adjacent_pairs(image: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of neighbouring pixels of one ``(H, W)`` image in ``direction``."""
    image = np.asarray(image)
    if direction == "horizontal":
        return image[:, :-1].ravel(), image[:, 1:].ravel()
    if direction == "vertical":
        return image[:-1, :].ravel(), image[1:, :].ravel()
    if direction == "diagonal":
        return image[:-1, :-1].ravel(), image[1:, 1:].ravel()
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def correlation(images: np.ndarray, direction: str) -> np.ndarray:
    """Pearson correlation of adjacent pixels per image (ideal 0; plain X-rays: about 0.9+).
    A constant image has no defined correlation and gives NaN."""
    values = []
    for image in as_stack(images):
        x, y = (v.astype(np.float64) for v in adjacent_pairs(image, direction))
        values.append(np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan)
    return np.asarray(values)


def correlation_threshold(height: int, width: int, direction: str, alpha: float = 0.05) -> float:
    """|r| above which adjacent pixels are correlated at level ``alpha`` (``sqrt(n) r`` is about
    standard normal for ``n`` independent pairs)."""
    pairs = {"horizontal": height * (width - 1), "vertical": (height - 1) * width,
             "diagonal": (height - 1) * (width - 1)}[direction]
    return float(stats.norm.ppf(1 - alpha / 2) / np.sqrt(pairs))


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """PSNR in dB per 8-bit image pair (infinite when identical)."""
    a, b = as_stack(reference).astype(np.float64), as_stack(test).astype(np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(F**2 / mse)


def ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Structural similarity per 8-bit image pair (scikit-image, data range 255)."""
    from skimage.metrics import structural_similarity

    return np.asarray([structural_similarity(a, b, data_range=F) for a, b in zip(as_stack(reference), as_stack(test))])


@dataclass(frozen=True)
class ProportionResult:
    """How many of ``count`` images (or keystreams) passed a test at ``alpha``, and whether that
    many is plausible for an ideal cipher."""

    passed_count: int
    count: int
    alpha: float
    min_passing: int
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def proportion_test(passes: np.ndarray, alpha: float, confidence: float = 0.999) -> ProportionResult:
    """Whether the share of passing items is what an ideal cipher gives.

    An ideal cipher fails each per-item test with probability ``alpha``, so the number of failures
    is binomial; the test fails when more items fail than an ideal cipher would with probability
    ``1 - confidence`` (the exact-binomial form of SP 800-22's proportion check, section 4.2.1).
    """
    passes = np.asarray(passes, dtype=bool)
    count = int(passes.size)
    allowed_failures = int(stats.binom.ppf(confidence, count, alpha))
    minimum = count - allowed_failures
    passed_count = int(passes.sum())
    return ProportionResult(passed_count, count, alpha, minimum, bool(count and passed_count >= minimum))
