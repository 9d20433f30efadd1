"""CKKS-encrypted aggregation without Ray: ``ckks_mod`` and ``CKKSAggregation`` called directly with
hand-made Flower messages and fit results, three sites holding a small CNN's state dict."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from flwr.app import MessageType
from flwr.common import FitRes, Parameters, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg, FedMedian
from flwr.server.strategy.aggregate import aggregate

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.federated.he_aggregation import (
    CKKS_TENSOR_TYPE,
    CKKSAggregation,
    ckks_mod,
    decrypt_parameters,
    encrypt_parameters,
    load_site_context,
    make_site_context,
    public_context,
)
from medsec.he.wire import SecretKeyRefused
from tests.federated.messages import (
    EXAMPLES,
    client,
    compare,
    context,
    encrypted_round,
    instruction,
    site_arrays,
)

EXPANSION = (8.0, 20.0)
"""Accepted ciphertext / float32 bytes of full 4096-value chunks (measured: 14.3)."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The key ceremony: the sites' context file (secret key) and the server's public bytes."""
    path = tmp_path_factory.mktemp("ckks") / "site.ctx"
    site = make_site_context(path)
    return {"path": path, "site": site, "public": public_context(site)}


@pytest.fixture(scope="module")
def federated_round(keys: dict) -> dict:
    """One round: three sites' ckks_mod encrypt their replies, the server adds them, and round 2's
    train message is decrypted by site 0's mod."""
    round_ = encrypted_round(ckks_mod(keys["site"]), CKKSAggregation(FedAvg(), keys["public"]), site_arrays)
    plain = aggregate([(site_arrays(i + 1), n) for i, n in enumerate(EXAMPLES)])
    return {**round_, "plain": plain}


def test_encrypted_aggregate_equals_plain_fedavg(keys: dict, federated_round: dict) -> None:
    round_ = federated_round
    assert all(np.array_equal(a, b) for a, b in zip(round_["first_seen"][0], round_["initial"]))  # round 1: plain
    for (_, res), examples in zip(round_["replies"], EXAMPLES):
        assert res.parameters.tensor_type == CKKS_TENSOR_TYPE and res.num_examples == examples
        assert json.loads(res.parameters.tensors[0])["examples"] == examples
    header = json.loads(round_["aggregated"].tensors[0])
    assert header["examples"] == sum(EXAMPLES)
    error = compare(round_["received"], round_["plain"])
    weighted = sum(n * np.concatenate([a.astype(np.float64).ravel() for a in site_arrays(i + 1)])
                   for i, n in enumerate(EXAMPLES))  # sum n_i w_i in float64, before the sites divide
    raw = np.concatenate([ts.ckks_vector_from(keys["site"], blob).decrypt() for blob in round_["aggregated"].tensors[1:]])
    relative = float(np.abs(raw - weighted).max() / np.abs(weighted).max())
    print(f"\nCKKS aggregate vs plain FedAvg (float32): max abs error {error:.2e} over {weighted.size} values; "
          f"encrypted sum vs float64: max relative error {relative:.2e}")
    assert error < 1e-4 and relative < 1e-6
    assert [a.dtype for a in round_["received"]] == [a.dtype for a in round_["initial"]]
    assert compare(decrypt_parameters(round_["aggregated"], round_["mod"].context), round_["plain"]) < 1e-4


def test_evaluate_message_is_decrypted_for_the_site(federated_round: dict) -> None:
    seen: list = []
    out = federated_round["mod"](instruction(MessageType.EVALUATE, federated_round["aggregated"]), context(),
                                 client(federated_round["initial"], 9, seen))
    assert compare(seen[0], federated_round["plain"]) < 1e-4
    assert compat.recorddict_to_evaluateres(out.content).num_examples == 9


def test_server_holds_no_secret_key_and_cannot_decrypt(keys: dict, federated_round: dict) -> None:
    server, aggregated = federated_round["server"], federated_round["aggregated"]
    assert not server.context.is_private() and not server.context.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server.context, aggregated.tensors[1]).decrypt()
    with pytest.raises(SecurityError, match="no secret key"):
        decrypt_parameters(aggregated, server.context)
    with pytest.raises(SecurityError, match="no secret key"):
        ckks_mod(server.context)
    assert server.evaluate(1, aggregated) is None


def test_server_refuses_a_secret_key_and_non_fedavg_strategies(keys: dict) -> None:
    with pytest.raises(SecretKeyRefused):
        CKKSAggregation(FedAvg(), keys["site"].serialize(save_secret_key=True))
    with pytest.raises(ConfigError, match="centralised evaluation"):
        CKKSAggregation(FedAvg(evaluate_fn=lambda rnd, arrays, config: None), keys["public"])
    with pytest.raises(ConfigError, match="FedMedian"):
        CKKSAggregation(FedMedian(), keys["public"])


def _replace_chunk(keys: dict, parameters: Parameters) -> list[bytes]:
    """Chunk 1 encrypted at scale 2^30 instead of the context's 2^40."""
    values = np.ones(4096).tolist()
    return [parameters.tensors[0], ts.ckks_vector(keys["site"], values, scale=2.0 ** 30).serialize(),
            *parameters.tensors[2:]]


def _inflating(keys: dict, parameters: Parameters) -> list[bytes]:
    """Chunk 1 replaced by a CKKS vector proto whose SEAL ciphertext is 10 MB of zlib-compressed zeros."""
    body = zlib.compress(bytes(10_000_000))
    seal = struct.pack("<2sBBBBHQ", b"\x5e\xa1", 16, 4, 0, 1, 0, 16 + len(body)) + body  # SEAL header, zlib
    length, varint = len(seal), b""
    while length >= 0x80:
        varint, length = varint + bytes([length & 0x7F | 0x80]), length >> 7
    return [parameters.tensors[0], b"\x12" + varint + bytes([length]) + seal, *parameters.tensors[2:]]


def _header(parameters: Parameters, **change: object) -> list[bytes]:
    header = {**json.loads(parameters.tensors[0]), **change}
    return [json.dumps(header).encode(), *parameters.tensors[1:]]


MALFORMED: dict[str, tuple[Callable[[dict, Parameters], list[bytes]], str]] = {
    "truncated": (lambda k, p: [p.tensors[0], p.tensors[1][: len(p.tensors[1]) // 2], *p.tensors[2:]],
                  r"parameters\[1\]: not a serialized TenSEAL CKKS vector"),
    "garbage": (lambda k, p: [p.tensors[0], os.urandom(5000), *p.tensors[2:]], r"parameters\[1\]: not a"),
    "oversized": (lambda k, p: [p.tensors[0], p.tensors[1] + bytes(300_000), *p.tensors[2:]],
                  r"parameters\[1\]: \d+ bytes, more than"),
    "inflating": (_inflating, r"parameters\[1\]: its ciphertext inflates to more than \d+ bytes"),
    "chunk missing": (lambda k, p: p.tensors[:-1], r"ciphertext chunks, the header's"),
    "chunk count": (lambda k, p: [*p.tensors, p.tensors[1]], r"ciphertext chunks, the header's"),
    "scale": (_replace_chunk, r"parameters\[1\]: scale 2\^30, the context's is 2\^40"),
    "other parameters": (lambda k, p: [p.tensors[0], ts.ckks_vector(
        _othercontext(), np.ones(2048).tolist()).serialize(), *p.tensors[2:]], r"not a CKKS vector for this context"),
    "header json": (lambda k, p: [b"\xff{", *p.tensors[1:]], r"parameters\[0\]: not a medsec CKKS header"),
    "header dtype": (lambda k, p: _header(p, arrays=[{"shape": [2], "dtype": "object"}]), r"dtype must be one of"),
    "header too big": (lambda k, p: _header(p, arrays=[{"shape": [2**20, 2**20], "dtype": "float32"}]),
                       r"more than \d+ values"),
    "header examples": (lambda k, p: _header(p, examples=True), r"examples must be an integer"),
    "examples mismatch": (lambda k, p: _header(p, examples=74), r"header says 74 examples, num_examples is 75"),
    "plain": (lambda k, p: None, r"plain parameters"),
}


def _othercontext() -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    context.global_scale = 2.0 ** 20
    return context


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_ciphertexts_are_refused_naming_the_site(keys: dict, federated_round: dict, case: str) -> None:
    change, message = MALFORMED[case]
    replies = list(federated_round["replies"])
    res = replies[1][1]
    tensors = change(keys, res.parameters)
    parameters = (ndarrays_to_parameters(site_arrays(2)) if tensors is None
                  else Parameters(tensors=tensors, tensor_type=CKKS_TENSOR_TYPE))
    replies[1] = (replies[1][0], FitRes(res.status, parameters, res.num_examples, res.metrics))
    with pytest.raises(DataError, match="site hospital-b") as caught:
        federated_round["server"].aggregate_fit(1, replies, [])
    assert caught.match(message)


def test_a_site_refuses_values_that_cannot_add_up(keys: dict) -> None:
    with pytest.raises(DataError, match="finite"):
        encrypt_parameters([np.array([1.0, np.nan], dtype=np.float32)], 3, keys["site"])
    with pytest.raises(DataError, match="below 2\\^40"):
        encrypt_parameters([np.array([1e10])], 1000, keys["site"])
    with pytest.raises(DataError, match="examples must be an integer from 1"):
        encrypt_parameters([np.zeros(3)], 0, keys["site"])


def test_bytes_per_update(keys: dict, federated_round: dict) -> None:
    """Ciphertext bytes over the same values as float32: full chunks and the small CNN."""
    values = np.random.default_rng(0).normal(0, 0.1, 4 * 4096).astype(np.float32)
    full = encrypt_parameters([values], 100, keys["site"])
    full_ratio = sum(len(t) for t in full.tensors[1:]) / values.nbytes
    cnn = federated_round["replies"][0][1].parameters
    plain_bytes = sum(a.size for a in federated_round["initial"]) * 4
    cnn_bytes = sum(len(t) for t in cnn.tensors)
    print(f"\nexpansion: {full_ratio:.1f}x per full chunk ({len(full.tensors[1])} bytes per 4096 values); "
          f"small_cnn(2,1,2,8): {cnn_bytes} bytes in {len(cnn.tensors) - 1} chunks for {plain_bytes} bytes of "
          f"float32 ({cnn_bytes / plain_bytes:.1f}x)")
    assert EXPANSION[0] < full_ratio < EXPANSION[1]
    assert full_ratio <= cnn_bytes / plain_bytes < 2 * EXPANSION[1]


def test_site_context_file_is_private_and_not_overwritten(keys: dict, tmp_path: Path) -> None:
    path = keys["path"]
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_site_context(path)
    assert loaded.is_private() and loaded.global_scale == 2.0 ** 40
    with pytest.raises(ConfigError, match="already exists"):
        make_site_context(path)
    public = tmp_path / "public.ctx"
    public.write_bytes(keys["public"])
    public.chmod(0o600)
    with pytest.raises(SecurityError, match="no secret key"):
        load_site_context(public)
    public.chmod(0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_site_context(public)
    link = tmp_path / "link.ctx"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symbolic link"):
        load_site_context(link)


def test_mod_from_a_path_loads_lazily_and_pickles_without_the_key(keys: dict, federated_round: dict) -> None:
    mod = ckks_mod(keys["path"])
    seen: list = []
    mod(instruction(MessageType.TRAIN, federated_round["aggregated"]), context(), client([], 1, seen))
    assert compare(seen[0], federated_round["plain"]) < 1e-4
    state = pickle.dumps(mod)
    assert len(state) < 1000  # the path, not the context (megabytes)
    assert pickle.loads(state).context.is_private()
