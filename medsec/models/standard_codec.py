"""A standard image codec (JPEG 2000 or WebP, through Pillow) behind the interface of the learned
codec, so that :class:`~medsec.protections.transmission.SecureChannel` can seal either."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medsec.analysis.image_codecs import CODECS

FORMATS = {"JPEG 2000": "JPEG2000", "WebP": "WEBP"}
"""Codec name -> Pillow's format name, for the codecs a channel may seal."""


class StandardCodec(torch.nn.Module):
    """A standard image codec (Pillow: JPEG 2000 or WebP) with the interface :class:`SecureChannel`
    uses, so the channel can seal a standard bitstream where a learned codec is not good enough yet.

    The decoder reads only a file whose header gives the format and size announced by the
    packet (checked before any pixel is decoded), so a file cannot make it decode more than the
    packet's image. Its ``format`` and ``setting`` are buffers: the channel's model digest names them.

    Args:
        format: ``"JPEG 2000"`` (``setting``: target bits per pixel) or ``"WebP"`` (quality 0-100).
        setting: the rate setting.
        in_channels: image channels, 1 (grey) or 3.
    """

    def __init__(self, format: str = "JPEG 2000", setting: float = 0.3, in_channels: int = 1) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got '{format}'")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.format, self.setting, self.in_channels = format, float(setting), in_channels
        self.coder = f"pillow/{FORMATS[format].lower()}"
        self.register_buffer("settings", torch.tensor([self.setting, float(in_channels)], dtype=torch.float64))

    def update(self, force: bool = False) -> bool:
        """Nothing to rebuild: the codec has no tables of its own."""
        return False

    def compress_image(self, image: torch.Tensor) -> tuple[bytes, bytes]:
        """The image (C, H, W) in [0, 1] as one file (and an empty second string)."""
        return CODECS[self.format](image.cpu(), self.setting), b""

    def decompress_image(self, y_string: bytes, z_string: bytes, size: Sequence[int]) -> torch.Tensor:
        """The image (C, H, W) of a file made by :meth:`compress_image`; a file of another format or
        size is refused before it is decoded."""
        mode = "L" if self.in_channels == 1 else "RGB"
        try:
            with Image.open(io.BytesIO(y_string), formats=[FORMATS[self.format]]) as file:
                if file.size != (size[1], size[0]):
                    raise ValueError(f"the {self.format} file is {file.size[1]}x{file.size[0]}, the packet announced "
                                     f"{size[0]}x{size[1]}")
                array = np.asarray(file.convert(mode), dtype=np.float32) / 255  # WebP keeps grey as RGB
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"not a readable {self.format} file ({err})") from None
        return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()
