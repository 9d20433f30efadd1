"""DeepKeyGen's networks: a key generator (seed image + secret noise map -> key image) and its critic."""
from __future__ import annotations

from medsec.models.encipher_gan import KeyedUNet, PatchCritic


class KeyGenerator(KeyedUNet):
    """Maps a seed image and a secret noise map (the key-map channel) to a key image in [0, 1],
    trained to look like the transformation domain."""


__all__ = ["KeyGenerator", "PatchCritic"]
