"""Standard codecs (Pillow JPEG, JPEG 2000, WebP), rate matching and the quality measures."""
from __future__ import annotations

import math

import pytest
import torch

from medsec.analysis.image_codecs import SETTINGS, available_codecs, encode, image_quality, jpeg_at_bpp


def smooth_image(size: int = 96, channels: int = 1) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(12 * xx) * torch.cos(9 * yy)
    noise = 0.05 * torch.rand(channels, size, size, generator=torch.Generator().manual_seed(0))
    return (base + noise).clamp(0, 1)


def test_pillow_here_writes_all_three() -> None:
    assert available_codecs() == ["JPEG", "JPEG 2000", "WebP"]


@pytest.mark.parametrize("codec", ["JPEG", "JPEG 2000", "WebP"])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_codec_round_trips_and_its_rate_grows_with_the_setting(codec: str, channels: int) -> None:
    image = smooth_image(channels=channels)
    low, high = encode(image, codec, SETTINGS[codec][1]), encode(image, codec, SETTINGS[codec][-1])
    for coded in (low, high):
        assert coded.decoded.shape == image.shape and coded.bpp == pytest.approx(8 * coded.num_bytes / 96**2)
    assert low.bpp < high.bpp
    assert image_quality(low.decoded, image)["psnr"] < image_quality(high.decoded, image)["psnr"]


def test_jpeg2000_setting_is_its_target_rate() -> None:
    coded = encode(smooth_image(128), "JPEG 2000", 0.5)
    assert coded.bpp == pytest.approx(0.5, rel=0.25)


def test_jpeg_matching_finds_the_closest_rate() -> None:
    image = smooth_image()
    for target in (1.0, 2.0):
        match = jpeg_at_bpp(image, target)
        assert match.bpp == pytest.approx(target, rel=0.15)
        neighbours = [encode(image, "JPEG", q).bpp for q in (match.setting - 1, match.setting + 1) if 1 <= q <= 95]
        assert all(abs(match.bpp - target) <= abs(bpp - target) for bpp in neighbours)
    assert jpeg_at_bpp(image, 100.0).setting == 95  # out of reach: the best JPEG offered


def test_quality_rounds_to_8_bits_and_adds_ms_ssim_for_large_images() -> None:
    clean = smooth_image(192)
    noisy = (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1)
    quality = image_quality(noisy, clean)
    mse = float(((torch.round(noisy * 255) / 255 - clean) ** 2).mean())
    assert quality["psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-4)
    assert 0 < quality["ms_ssim"] < 1 and 0 < quality["ssim"] < 1
    assert image_quality(clean, clean)["ms_ssim"] == pytest.approx(1.0, abs=1e-3)
    assert "ms_ssim" not in image_quality(noisy[:, :64, :64], clean[:, :64, :64])
