"""The latency layout's matrix-vector product, checked in float64 against ``x @ W + b``."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.errors import ConfigError
from medsec.he.diagonal import NumpyOps, plan_layer, replicate


@pytest.mark.parametrize(("n_in", "n_out"), [(784, 256), (256, 32), (32, 2), (3, 10), (5, 5), (1, 1)])
def test_diagonal_product_equals_the_matrix_product(n_in: int, n_out: int) -> None:
    rng = np.random.default_rng(n_in * 1000 + n_out)
    matrix, bias, x = rng.normal(size=(n_in, n_out)), rng.normal(size=n_out), rng.normal(size=n_in)
    plan = plan_layer("0", matrix, bias, 4096)
    y = plan.apply(replicate(x, 4096), NumpyOps())
    np.testing.assert_allclose(y[:n_out], x @ matrix + bias, atol=1e-10)
    # the output repeats with period m: it is the next layer's input layout as it stands
    np.testing.assert_allclose(y, np.tile(y[:plan.m], 4096 // plan.m), atol=1e-10)


def test_rotations_grow_with_the_square_root_of_the_outputs() -> None:
    plan = plan_layer("conv", np.ones((784, 256)), np.zeros(256), 4096)
    assert (plan.n, plan.m, plan.baby, plan.giant) == (1024, 256, 16, 16)
    assert plan.rotations == 15 + 15 + 2  # baby steps, giant steps, fold 1024 -> 256


def test_zero_diagonals_are_skipped_and_an_all_zero_layer_refused() -> None:
    identity = plan_layer("id", np.eye(8), np.zeros(8), 64)
    assert list(identity.diagonals) == [(0, 0)]
    x = np.arange(8.0)
    np.testing.assert_allclose(identity.apply(replicate(x, 64), NumpyOps())[:8], x)
    with pytest.raises(ConfigError, match="layer zero has only zero weights"):
        plan_layer("zero", np.zeros((4, 2)), np.zeros(2), 64).apply(replicate(np.ones(4), 64), NumpyOps())
    with pytest.raises(ConfigError, match="layer big needs 128 slots per image, the ciphertext has 64"):
        plan_layer("big", np.ones((100, 2)), np.zeros(2), 64)
