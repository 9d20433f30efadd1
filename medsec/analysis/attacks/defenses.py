"""Input-transformation defences applied at evaluation (adversarial training is a protection:
:mod:`medsec.protections.adversarial_training`)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.layers import median_filter
from torchvision.io import decode_jpeg, encode_jpeg

from medsec.errors import ConfigError

Defense = Callable[[torch.Tensor], torch.Tensor]


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Re-encode each 2D image as JPEG at ``quality`` (removes high-frequency perturbations)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"the jpeg defence needs 2D images with 1 or 3 channels, got shape {tuple(images.shape)}")
    as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    decoded = [decode_jpeg(encode_jpeg(image, quality=quality)) for image in as_bytes]
    return torch.stack(decoded).to(images.device, torch.float32) / 255


def median(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Median filter over each channel (2D or 3D)."""
    return median_filter(images, kernel_size=size)


DEFENSES: dict[str, Defense | None] = {"none": None, "jpeg": jpeg, "median": median}


def get_defense(name: str) -> Defense | None:
    if name not in DEFENSES:
        raise ConfigError(f"defenses: unknown defence '{name}'; choose from {list(DEFENSES)}")
    return DEFENSES[name]
