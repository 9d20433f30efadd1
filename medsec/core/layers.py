"""A network as a list of affine maps and squares: what the HE compiler produces
(:mod:`medsec.he.compiler`) and what the secret-sharing servers evaluate (:mod:`medsec.mpc`).
numpy only, so that a secret-sharing server never imports torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Layer:
    """One step: ``x @ matrix + bias`` (``kind='affine'``) or ``x * x`` (``'square'``)."""

    kind: str
    matrix: np.ndarray | None = None
    bias: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x * x if self.kind == "square" else x @ self.matrix + self.bias


def run_layers(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """Plaintext evaluation of ``layers`` in float64 on ``[n, features]``: the reference that the
    encrypted and secret-shared evaluations are measured against."""
    for layer in layers:
        x = layer.apply(x)
    return x
