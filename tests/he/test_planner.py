"""The CKKS parameter planner: numbers derived from depth, range and precision; clear errors."""
from __future__ import annotations

import pytest

from medsec.errors import ConfigError
from medsec.he import CKKSParams, plan_parameters
from medsec.he.planner import MAX_MODULUS_BITS, noise_bits


def test_plan_for_the_default_he_cnn_depth() -> None:
    params = plan_parameters(depth=5, max_abs=100.0, precision_bits=12)
    # 8192 is the smallest degree whose 218-bit budget holds the chain
    assert params.poly_modulus_degree == 8192 and params.slots == 4096
    assert params.scale_bits == 12 + noise_bits(8192) == 27
    assert params.integer_bits == 8  # ceil(log2(101)) + sign bit
    first, *middle, special = params.coeff_mod_bit_sizes
    assert first == 27 + 8 and middle == [27] * 5 and first <= special <= 60
    assert params.modulus_bits <= MAX_MODULUS_BITS[8192]


def test_deeper_or_wider_needs_a_larger_ring() -> None:
    assert plan_parameters(depth=6, max_abs=100.0, precision_bits=12).poly_modulus_degree == 16384
    assert plan_parameters(depth=2, max_abs=1.0, precision_bits=4).poly_modulus_degree == 4096
    assert plan_parameters(depth=2, max_abs=1.0, precision_bits=4, min_slots=5000).poly_modulus_degree == 16384


def test_too_deep_model_gets_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"multiplicative depth 40 .* use fewer layers \(model.net.hidden\)"):
        plan_parameters(depth=40, max_abs=10.0)
    with pytest.raises(ConfigError, match="precision_bits must be within 1..40"):
        plan_parameters(depth=3, max_abs=1.0, precision_bits=0)
    with pytest.raises(ConfigError, match="max_abs"):
        plan_parameters(depth=3, max_abs=float("nan"))


def test_params_round_trip_and_bad_dict() -> None:
    params = plan_parameters(depth=3, max_abs=4.0)
    assert CKKSParams.from_dict(params.to_dict()) == params
    with pytest.raises(ConfigError, match="params: not a CKKS parameter set"):
        CKKSParams.from_dict({"poly_modulus_degree": 8192})


def test_schemes_are_chosen_by_name() -> None:
    from medsec.errors import ConfigError
    from medsec.he.schemes import BFV, CKKS, get_scheme

    assert isinstance(get_scheme("ckks"), CKKS) and get_scheme("ckks").modes == ("throughput", "latency")
    assert get_scheme("bfv", weight_bits=5).weight_bits == 5 and isinstance(get_scheme("bfv"), BFV)
    with pytest.raises(ConfigError, match="scheme: unknown homomorphic scheme 'tfhe'; one of \\['bfv', 'ckks'\\]"):
        get_scheme("tfhe")
