"""Noise models for denoising: seeded, MONAI-style randomizable transforms on images in [0, 1].

Each model draws its level once per call (per image) uniformly from a ``levels`` range:

- ``gaussian``: additive white Gaussian noise, level = standard deviation ``sigma``.
- ``poisson``: photon-counting (shot) noise for low-dose CT/X-ray, level = ``dose``, the photon
  count at intensity 1: ``noisy = Poisson(dose * x) / dose`` (variance ``x / dose``; a lower dose
  is noisier).
- ``rician``: MRI magnitude noise, level = ``sigma`` of the Gaussian noise on the real and the
  imaginary channel: ``noisy = |x + n1 + i n2|`` (biased upwards: ``sigma sqrt(pi / 2)`` on a zero
  background).
- ``speckle``: multiplicative noise as in ultrasound, level = ``sigma``: ``noisy = x (1 + n)``.

MONAI's own ``RandGaussianNoise``/``RandRicianNoise`` draw the standard deviation from ``[0, std]``
and MONAI has no Poisson or speckle noise, so the four share one small base class here. Results
are clipped to [0, 1] (like a stored 8-bit image) unless ``clip=False``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.transforms import RandomizableTransform

from medsec.errors import ConfigError, DataError

RANGE_TOLERANCE = 1e-4


class RandNoise(RandomizableTransform):
    """Corrupt a tensor (any shape, values in [0, 1]) with noise of a level drawn from ``levels``.

    Args:
        levels: ``(low, high)`` range the level is drawn from per call, or one number.
        clip: clip the noisy image to [0, 1].
        seed: seeds the transform's random state (``set_random_state`` re-seeds it).
    """

    name: ClassVar[str]
    level_name: ClassVar[str] = "sigma"

    def __init__(self, levels: float | Sequence[float], clip: bool = True, seed: int | None = 0) -> None:
        super().__init__(prob=1.0)
        self.levels = parse_levels(levels, self.name)
        for level in self.levels:
            self.check_level(level)
        self.clip = clip
        self.level = self.levels[0]
        self.set_random_state(seed)

    @classmethod
    def check_level(cls, level: float) -> None:
        """Raise a :class:`ConfigError` naming the field when ``level`` is not allowed."""
        if not 0 <= level <= 1:
            raise ConfigError(f"task.noise.levels: {cls.name} {cls.level_name} must be in [0, 1], got {level}")

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.level = float(self.R.uniform(*self.levels))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        x = torch.as_tensor(img)
        low, high = float(x.min()), float(x.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise DataError(f"{self.name} noise expects images in [0, 1]; got values in [{low:.3g}, {high:.3g}]")
        clean = x.detach().cpu().double().numpy()
        noisy = torch.from_numpy(self.corrupt(clean, self.level)).to(device=x.device, dtype=x.dtype)
        return noisy.clamp(0, 1) if self.clip else noisy

    def corrupt(self, clean: np.ndarray, level: float) -> np.ndarray:
        """The noisy version of ``clean`` at ``level``, drawn from ``self.R``."""
        raise NotImplementedError

    def gaussian(self, shape: Sequence[int], sigma: float) -> np.ndarray:
        return self.R.normal(0.0, sigma, size=shape) if sigma > 0 else np.zeros(shape)


class GaussianNoise(RandNoise):
    """Additive white Gaussian noise of standard deviation ``sigma``."""

    name = "gaussian"

    def corrupt(self, clean: np.ndarray, level: float) -> np.ndarray:
        return clean + self.gaussian(clean.shape, level)


class PoissonNoise(RandNoise):
    """Photon-counting noise at ``dose`` photons for intensity 1 (low-dose CT/X-ray)."""

    name = "poisson"
    level_name = "dose"

    @classmethod
    def check_level(cls, level: float) -> None:
        if not level > 0:
            raise ConfigError(f"task.noise.levels: poisson dose (photons at intensity 1) must be positive, got {level}")

    def corrupt(self, clean: np.ndarray, level: float) -> np.ndarray:
        return self.R.poisson(clean * level) / level


class RicianNoise(RandNoise):
    """Magnitude of the image plus complex Gaussian noise of ``sigma`` per channel (MRI)."""

    name = "rician"

    def corrupt(self, clean: np.ndarray, level: float) -> np.ndarray:
        real = clean + self.gaussian(clean.shape, level)
        return np.hypot(real, self.gaussian(clean.shape, level))


class SpeckleNoise(RandNoise):
    """Multiplicative noise ``x (1 + n)``, ``n`` Gaussian of ``sigma`` (ultrasound speckle)."""

    name = "speckle"

    def corrupt(self, clean: np.ndarray, level: float) -> np.ndarray:
        return clean * (1 + self.gaussian(clean.shape, level))


NOISE_MODELS: dict[str, type[RandNoise]] = {cls.name: cls for cls in (GaussianNoise, PoissonNoise, RicianNoise,
                                                                      SpeckleNoise)}
"""The noise models by name (``task.noise.name``)."""


def parse_levels(levels: float | Sequence[float], name: str) -> tuple[float, float]:
    """A level or ``(low, high)`` range as a sorted pair; :class:`ConfigError` naming the field otherwise."""
    values = [levels] if isinstance(levels, (int, float)) else list(levels)
    try:
        pair = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task.noise.levels: {name} needs a number or [low, high], got {levels!r}") from err
    if len(pair) not in (1, 2) or not all(np.isfinite(pair)):
        raise ConfigError(f"task.noise.levels: {name} needs a number or [low, high], got {levels!r}")
    if len(pair) == 2 and pair[0] > pair[1]:
        raise ConfigError(f"task.noise.levels: {name} range must be [low, high] with low <= high, got {pair}")
    return (pair[0], pair[-1])


def noise_class(name: str) -> type[RandNoise]:
    """The noise model called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in NOISE_MODELS:
        raise ConfigError(f"task.noise.name: unknown noise model '{name}'; choose one of {sorted(NOISE_MODELS)}")
    return NOISE_MODELS[name]


def build_noise(config: Mapping[str, Any], seed: int | None = 0) -> RandNoise:
    """A noise transform from a ``task.noise`` config: ``{name: ..., levels: [low, high], clip: true}``."""
    unknown = set(config) - {"name", "levels", "clip"}
    if unknown or "name" not in config or "levels" not in config:
        raise ConfigError(f"task.noise needs 'name' and 'levels' (optional 'clip'), got keys {sorted(config)}")
    return noise_class(str(config["name"]))(config["levels"], clip=bool(config.get("clip", True)), seed=seed)


def level_slug(level: float) -> str:
    """A level as it appears in metric names: ``0.05`` -> ``0.05``, ``100.0`` -> ``100``."""
    return f"{level:g}"
