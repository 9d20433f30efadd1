"""Classical denoisers (scikit-image) behind the network interface, so that
:class:`~medsec.tasks.denoising.DenoisingTask` evaluates them exactly as it evaluates networks:
``model.net._target_: medsec.models.baselines.NonLocalMeans`` and ``trainer.test``.

Both are blind, like the networks: they do not know the noise level. Non-local means estimates
the noise standard deviation of every image (:func:`estimate_sigma`, Donoho's wavelet median
estimator) and filters with ``h = h_factor * sigma``; the Gaussian filter has a fixed width.
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage.restoration import denoise_nl_means
from torch import nn


def estimate_sigma(image: np.ndarray) -> float:
    """Noise standard deviation of an image: median absolute finest-scale Haar detail coefficient
    (all axes high-pass) / 0.6745 (Donoho and Johnstone 1994). scikit-image's ``estimate_sigma``
    does the same with Daubechies wavelets but needs PyWavelets, which medsec does not depend on."""
    detail = np.asarray(image, dtype=np.float64)
    for axis in range(detail.ndim):
        even = detail.shape[axis] - detail.shape[axis] % 2
        pairs = np.take(detail, np.arange(even), axis=axis)
        detail = (np.take(pairs, np.arange(0, even, 2), axis=axis) - np.take(pairs, np.arange(1, even, 2), axis=axis))
        detail = detail / np.sqrt(2)
    return float(np.median(np.abs(detail)) / 0.6745)


class ClassicalDenoiser(nn.Module):
    """Applies :meth:`denoise_image` to every (C, *spatial) image of a batch, on the CPU in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().double().numpy()
        out = np.stack([np.stack([self.denoise_image(channel) for channel in image]) for image in images])
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    @abstractmethod
    def denoise_image(self, image: np.ndarray) -> np.ndarray:
        """One single-channel image (2D or 3D) in [0, 1], denoised."""


class GaussianFilter(ClassicalDenoiser):
    """Gaussian smoothing of ``sigma`` pixels (scipy.ndimage)."""

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.sigma = sigma

    def denoise_image(self, image: np.ndarray) -> np.ndarray:
        return gaussian_filter(image, self.sigma, mode="reflect")


class NonLocalMeans(ClassicalDenoiser):
    """Non-local means (Buades et al. 2005; scikit-image's fast variant) with the noise level
    estimated per image: ``h = h_factor * sigma_est``, ``sigma = sigma_est`` (Darbon's distance
    correction), ``patch_size`` x ``patch_size`` patches searched within ``patch_distance``."""

    def __init__(self, h_factor: float = 0.8, patch_size: int = 5, patch_distance: int = 6) -> None:
        super().__init__()
        self.h_factor = h_factor
        self.patch_size = patch_size
        self.patch_distance = patch_distance

    def denoise_image(self, image: np.ndarray) -> np.ndarray:
        sigma = estimate_sigma(image)
        return denoise_nl_means(image, h=self.h_factor * sigma, sigma=sigma, patch_size=self.patch_size,
                                patch_distance=self.patch_distance, fast_mode=True)
