"""Client-level differential privacy: what a federation with clipped, noised updates spends.

Each round releases the mean of the sampled sites' updates, each clipped to norm C, plus Gaussian
noise of standard deviation ``sigma * C / m`` (Flower's ``DifferentialPrivacyClientSideFixedClipping``
with ``m`` sampled sites): a subsampled Gaussian mechanism with noise multiplier ``sigma`` on a
neighbouring relation that adds or removes one site (McMahan et al. 2018, DP-FedAvg). Opacus' RDP
analysis composes it over the rounds.
"""
from __future__ import annotations

import math

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from medsec.errors import ConfigError


def client_level_epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` rounds sampling each site with probability ``sample_rate``
    (Opacus RDP; Flower samples a fixed number of sites, which this rate approximates when < 1)."""
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"federation.client_dp: the share of sites per round must be in (0, 1], got {sample_rate}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)
