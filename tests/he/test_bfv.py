"""BFV: the quantised he_cnn evaluated exactly on encrypted integers; the planner's guarantees; bad input."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from medsec.errors import ConfigError, DataError
from medsec.he.bfv import (
    BFVCard,
    BFVClient,
    BFVServer,
    QuantisedProgram,
    coeff_modulus_bits,
    crt,
    plan_bfv,
    quantise,
)
from medsec.he.wire import SecretKeyRefused, context_bytes, pack
from tests.he.tiny import tiny


@pytest.fixture(scope="module")
def quantised() -> QuantisedProgram:
    return quantise(tiny()[1], input_bits=8, weight_bits=6)


@pytest.fixture(scope="module")
def card(quantised: QuantisedProgram) -> BFVCard:
    return quantised.card()


def flat(images) -> np.ndarray:
    return images.double().numpy().reshape(len(images), -1)


def test_quantised_model_tracks_the_float_program_and_stays_within_its_worst_case_bounds(quantised) -> None:
    _, program, images = tiny()
    x = np.concatenate([flat(images), np.zeros((1, 64)), np.ones((1, 64)), np.random.default_rng(0).random((64, 64))])
    assert np.abs(quantised.forward(x) - program.forward(x)).max() < 0.05 * np.abs(program.forward(x)).max()
    v = quantised.encode_input(x).astype(object)
    for layer, bound in zip(quantised.layers, quantised.bounds, strict=True):
        v = v * v if layer.kind == "square" else v @ layer.matrix.astype(object) + layer.bias
        assert np.abs(v).max() <= bound


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_planner_holds_every_value_and_picks_batching_primes(quantised, card, mode: str) -> None:
    params = card.params[mode]
    assert math.prod(params.plain_moduli) > 2 * max(quantised.bounds)
    assert all(t % (2 * params.poly_modulus_degree) == 1 for t in params.plain_moduli)
    assert len(set(params.plain_moduli)) == len(params.plain_moduli) and params.noise_left_bits >= 10


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_encrypted_logits_equal_the_quantised_model_exactly(quantised, card, mode: str) -> None:
    images = tiny()[2][:3]
    client = BFVClient(card, mode)
    server = BFVServer(quantised, client.public_context(), card.params)
    assert not server.has_secret_key()
    answers = [server.evaluate(mode, client.encrypt(images[part].numpy())) for part in client.batches(len(images))]
    got = np.concatenate([client.decrypt_integers(a, len(range(len(images))[part]))
                          for a, part in zip(answers, client.batches(len(images)), strict=True)])
    expected = quantised.integers(flat(images))
    assert got.shape == expected.shape and all(int(a) == int(b) for a, b in zip(got.ravel(), expected.ravel()))


def test_latency_keys_cover_only_the_rotations_the_layers_take(card) -> None:
    steps = card.params["latency"].rotation_steps
    assert steps and all(k & (k - 1) == 0 for k in steps)  # powers of two
    assert max(steps) < card.params["latency"].poly_modulus_degree // 2


def test_crt_recovers_signed_integers() -> None:
    moduli, values = (97, 101, 103), np.array([0, 1, -1, 500_000, -503_000], dtype=object)
    residues = [np.array([int(v) % m for v in values], dtype=np.uint64) for m in moduli]
    assert list(crt(residues, moduli)) == list(values)


def test_a_model_that_would_overflow_is_refused_naming_the_layer() -> None:
    deep = quantise(tiny()[1], input_bits=16, weight_bits=16)
    deep.bounds = [*deep.bounds[:-1], 2 ** 400]  # as if the last layer reached 2^400
    with pytest.raises(ConfigError, match=r"layer 4 \(affine\) reaches 2\^401"):
        plan_bfv(deep, "throughput")


def test_options_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigError, match="weight_bits"):
        quantise(tiny()[1], weight_bits=1)


def test_exhausted_noise_is_an_error_not_a_wrong_answer(quantised, card) -> None:
    prime = sealapi.PlainModulus.Batching(4096, [40])[0].value()  # too large a plain modulus for N=4096's budget
    small = dataclasses.replace(card.params["throughput"], poly_modulus_degree=4096,
                                coeff_mod_bit_sizes=coeff_modulus_bits(4096), plain_moduli=(prime,))
    weak = dataclasses.replace(card, params={"throughput": small})
    client = BFVClient(weak, "throughput")
    server = BFVServer(quantised, client.public_context())
    answer = server.evaluate("throughput", client.encrypt(tiny()[2][:2].numpy()))
    with pytest.raises(DataError, match="no noise budget left"):
        client.decrypt_integers(answer, 2)


def test_the_server_refuses_secret_keys_other_schemes_and_other_moduli(quantised, card) -> None:
    client = BFVClient(card, "throughput")
    with_secret = pack([client.contexts[0].serialize(save_secret_key=True), b""] * len(client.contexts))
    with pytest.raises(SecretKeyRefused):
        BFVServer(quantised, with_secret, card.params)
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 21, 40])
    with pytest.raises(Exception, match=r"context\[0\]: scheme CKKS"):
        BFVServer(quantised, pack([context_bytes(ckks), b""]), card.params)
    other = BFVClient(dataclasses.replace(card, params={"throughput": dataclasses.replace(
        card.params["throughput"], plain_moduli=card.params["latency"].plain_moduli[:1])}), "throughput")
    with pytest.raises(Exception, match="plain moduli .* differ from the model card"):
        BFVServer(quantised, other.public_context(), card.params)
    with pytest.raises(Exception, match="a \\(context, Galois keys\\) pair per plain modulus"):
        BFVServer(quantised, pack([context_bytes(client.contexts[0])]), card.params)


def test_malformed_ciphertexts_are_named(quantised, card) -> None:
    client = BFVClient(card, "throughput")
    server = BFVServer(quantised, client.public_context(), card.params)
    blobs = client.encrypt(tiny()[2][:2].numpy())
    with pytest.raises(Exception, match="ciphertexts: expected 64 per plain modulus"):
        server.evaluate("throughput", blobs[:-1])
    broken = [*blobs[:5], b"not a ciphertext", *blobs[6:]]
    with pytest.raises(Exception, match=r"ciphertexts\[5\]: not a ciphertext for the uploaded context"):
        server.evaluate("throughput", broken)
    with pytest.raises(Exception, match="mode: must be one of"):
        server.evaluate("fast", blobs)
