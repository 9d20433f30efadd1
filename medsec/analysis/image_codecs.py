"""Standard image codecs (Pillow: JPEG, JPEG 2000, WebP) and the image quality measures a learned
codec is compared with them by.

Every rate counts the whole file (headers included) in bits per pixel (per spatial position, all
channels together); every quality is of the decoded 8-bit image against the original.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, features
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

MS_SSIM_MIN_SIZE = 161
"""Smallest image side torchmetrics' five-scale MS-SSIM (11-pixel window) accepts."""


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """An image (C, H, W) in [0, 1] as 8-bit (H, W) for C = 1, (H, W, 3) for C = 3."""
    array = np.round(image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    return array[..., 0] if array.shape[2] == 1 else array


def from_bytes(data: bytes, channels: int) -> torch.Tensor:
    """The decoded image (C, H, W) in [0, 1] of an image file, as ``channels`` channels."""
    decoded = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    array = np.asarray(decoded, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)


def bits_per_pixel(num_bytes: int, image_shape: tuple[int, ...] | list[int] | torch.Size) -> float:
    """Bits per pixel (per spatial position, all channels together) of ``num_bytes``."""
    return 8 * num_bytes / int(np.prod(image_shape[1:]))


def _save(image: torch.Tensor, format_name: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format_name, **options)
    return buffer.getvalue()


def _jpeg(image: torch.Tensor, setting: float) -> bytes:
    """Baseline JPEG with optimised Huffman tables; ``setting``: quality 1-95."""
    return _save(image, "JPEG", quality=int(setting), optimize=True)


def _jpeg2000(image: torch.Tensor, setting: float) -> bytes:
    """JPEG 2000 (OpenJPEG, 9/7 wavelet); ``setting``: the target rate in bits per pixel."""
    ratio = 8 * image.shape[0] / setting
    return _save(image, "JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True)


def _webp(image: torch.Tensor, setting: float) -> bytes:
    """Lossy WebP at its slowest, best method; ``setting``: quality 0-100."""
    return _save(image, "WEBP", quality=int(setting), method=6)


CODECS: dict[str, Callable[[torch.Tensor, float], bytes]] = {"JPEG": _jpeg, "JPEG 2000": _jpeg2000, "WebP": _webp}
"""Codec name -> encoder of an image at a setting (quality, or target bpp for JPEG 2000)."""
SETTINGS: dict[str, tuple[float, ...]] = {
    "JPEG": (2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90),
    "JPEG 2000": (0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
    "WebP": (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90),
}
"""The settings an RD curve sweeps, low rate to high (covering about 0.05-1 bpp on 256x256 X-rays)."""


def available_codecs() -> list[str]:
    """The codecs this Pillow can write (JPEG 2000 and WebP are optional features)."""
    optional = {"JPEG 2000": "jpg_2000", "WebP": "webp"}
    return [name for name in CODECS if name not in optional or features.check(optional[name])]


@dataclass(frozen=True)
class Coded:
    """One image through a standard codec: its setting, file size, rate and decoded image."""

    codec: str
    setting: float
    num_bytes: int
    bpp: float
    decoded: torch.Tensor


def encode(image: torch.Tensor, codec: str, setting: float) -> Coded:
    """``image`` (C, H, W) in [0, 1], C = 1 or 3, through ``codec`` at ``setting``, and back."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec '{codec}'; choose one of {list(CODECS)}")
    data = CODECS[codec](image, setting)
    return Coded(codec, setting, len(data), bits_per_pixel(len(data), image.shape), from_bytes(data, image.shape[0]))


def jpeg_at_bpp(image: torch.Tensor, target_bpp: float, qualities: tuple[int, int] = (1, 95)) -> Coded:
    """The JPEG of ``image`` whose rate is closest to ``target_bpp``, by bisection over the quality
    (the rate grows with quality). Out of reach targets give the end qualities."""
    cache: dict[int, Coded] = {}

    def at(quality: int) -> Coded:
        if quality not in cache:
            cache[quality] = encode(image, "JPEG", quality)
        return cache[quality]

    low, high = qualities
    while low < high:  # smallest quality reaching the target
        middle = (low + high) // 2
        if at(middle).bpp >= target_bpp:
            high = middle
        else:
            low = middle + 1
    candidates = [at(low)] + ([at(low - 1)] if low > qualities[0] else [])
    return min(candidates, key=lambda result: abs(result.bpp - target_bpp))


def image_quality(received: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """PSNR (dB), SSIM and, for images of at least :data:`MS_SSIM_MIN_SIZE` pixels a side, MS-SSIM of
    ``received`` against ``clean`` (both (C, H, W) in [0, 1]), after rounding ``received`` to 8
    bits as a stored image would be."""
    received = torch.round(received.detach().clamp(0, 1) * 255).unsqueeze(0).cpu() / 255
    clean = clean.unsqueeze(0).float().cpu()
    quality = {"psnr": float(peak_signal_noise_ratio(received, clean, data_range=1.0)),
               "ssim": float(structural_similarity_index_measure(received, clean, data_range=1.0))}
    if min(clean.shape[2:]) >= MS_SSIM_MIN_SIZE:
        quality["ms_ssim"] = float(multiscale_structural_similarity_index_measure(received, clean, data_range=1.0))
    return quality
