"""Paillier-encrypted aggregation without Ray: ``paillier_mod`` and ``PaillierAggregation`` called
directly with hand-made Flower messages, three sites holding a small CNN's state dict (1024-bit key
for speed; the 2048-bit cost is measured in the slow test)."""
from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MessageType
from flwr.common import FitRes, Parameters, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg, FedMedian
from flwr.server.strategy.aggregate import aggregate

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.federated.paillier_aggregation import (
    FRAC_BITS,
    PAILLIER_TENSOR_TYPE,
    PaillierAggregation,
    decrypt_average,
    decrypt_parameters,
    encrypt_parameters,
    load_site_key,
    make_site_key,
    paillier_mod,
    public_key,
)
from medsec.he.paillier import (
    BATCH_MAGIC,
    FINGERPRINT_BYTES,
    ciphertexts_to_bytes,
    generate_keypair,
    private_key_bytes,
)
from tests.conftest import run_verb
from tests.federated.messages import (
    EXAMPLES,
    SITES,
    client,
    compare,
    context,
    encrypted_round,
    instruction,
    site_arrays,
)

WIDTH = 4
"""small_cnn(2, 1, 2, 4): 2,395 values, 200 ciphertexts of 12 slots under a 1024-bit key."""
BOUND = 2.0 ** -(FRAC_BITS + 1) + 1e-12
"""|Paillier average - float64 FedAvg|: the fixed point's 2^-(f+1), plus float64 rounding."""


def _arrays(site: int) -> list[np.ndarray]:
    return site_arrays(site, WIDTH)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The key ceremony: the sites' private key file and the server's public key bytes."""
    path = tmp_path_factory.mktemp("paillier") / "site.key"
    site = make_site_key(path, 1024)
    return {"path": path, "site": site, "public": public_key(site)}


@pytest.fixture(scope="module")
def federated_round(keys: dict) -> dict:
    """One round: three sites' paillier_mod encrypt their replies, the server adds them, and round 2's
    train message is decrypted by site 0's mod."""
    round_ = encrypted_round(paillier_mod(keys["site"]), PaillierAggregation(FedAvg(), keys["public"]), _arrays)
    initial = round_["initial"]
    weighted = [(_arrays(i + 1), n) for i, n in enumerate(EXAMPLES)]
    plain = [sum(n * a[k].astype(np.float64) for a, n in weighted) / sum(EXAMPLES) for k in range(len(initial))]
    return {**round_, "plain": plain}


def test_encrypted_aggregate_equals_plain_fedavg(keys: dict, federated_round: dict) -> None:
    round_ = federated_round
    assert all(np.array_equal(a, b) for a, b in zip(round_["first_seen"][0], round_["initial"]))  # round 1: plain
    for (_, res), examples in zip(round_["replies"], EXAMPLES):
        assert res.parameters.tensor_type == PAILLIER_TENSOR_TYPE and res.num_examples == examples
        assert json.loads(res.parameters.tensors[0])["examples"] == examples
    assert json.loads(round_["aggregated"].tensors[0])["examples"] == sum(EXAMPLES)
    _, flat = decrypt_average(round_["aggregated"], keys["site"])  # float64, before the cast to the dtypes
    error = float(np.abs(flat - np.concatenate([a.ravel() for a in round_["plain"]])).max())
    print(f"\nPaillier aggregate vs float64 FedAvg: max abs error {error:.2e} (bound {BOUND:.2e}) over {flat.size} "
          "values")
    assert error <= BOUND
    assert compare(round_["received"], round_["plain"]) < 1e-6  # float32 rounding on top
    flower = aggregate([(_arrays(i + 1), n) for i, n in enumerate(EXAMPLES)])  # Flower's own FedAvg
    assert compare(round_["received"], flower) < 1e-6
    assert [a.dtype for a in round_["received"]] == [a.dtype for a in round_["initial"]]


def test_evaluate_message_is_decrypted_for_the_site(federated_round: dict) -> None:
    seen: list = []
    out = federated_round["mod"](instruction(MessageType.EVALUATE, federated_round["aggregated"]), context(),
                                 client(federated_round["initial"], 9, seen))
    assert compare(seen[0], federated_round["plain"]) < 1e-6
    assert compat.recorddict_to_evaluateres(out.content).num_examples == 9


def test_server_holds_no_private_key(keys: dict, federated_round: dict) -> None:
    server = federated_round["server"]
    state = pickle.dumps(server.public_key) + repr(server).encode()
    site = keys["site"]
    assert server.public_key.n == site.public_key.n
    assert not any(hasattr(server.public_key, name) for name in ("p", "q", "hp", "hq"))
    assert hex(site.p)[2:].encode() not in state and str(site.p).encode() not in state
    with pytest.raises(SecurityError, match="private key"):
        decrypt_parameters(federated_round["aggregated"], server.public_key)
    with pytest.raises(SecurityError, match="holds a private key"):
        PaillierAggregation(FedAvg(), private_key_bytes(site))
    with pytest.raises(SecurityError, match="holds a private key"):
        PaillierAggregation(FedAvg(), site)
    with pytest.raises(ConfigError, match="centralised evaluation"):
        PaillierAggregation(FedAvg(evaluate_fn=lambda rnd, arrays, config: None), keys["public"])
    with pytest.raises(ConfigError, match="FedMedian"):
        PaillierAggregation(FedMedian(), keys["public"])
    assert server.evaluate(1, federated_round["aggregated"]) is None


def _batch(tensors: list[bytes], change: Callable[[bytes], bytes]) -> list[bytes]:
    return [tensors[0], change(tensors[1])]


HEAD = len(BATCH_MAGIC) + FINGERPRINT_BYTES + 4
"""Bytes of a batch before its ciphertexts; each takes 256 bytes under a 1024-bit key."""


def _other_key(keys: dict, parameters: Parameters) -> list[bytes]:
    """As many ciphertexts, of the same width, under a key the server does not hold."""
    other, _ = generate_keypair(1024)
    count = (len(parameters.tensors[1]) - HEAD) // 256
    return [parameters.tensors[0], ciphertexts_to_bytes(other, [other.raw_encrypt(1)] * count)]


def _replace(keys: dict, parameters: Parameters, index: int, value: int) -> list[bytes]:
    """Ciphertext ``index`` replaced by ``value`` (fixed width, same key fingerprint)."""
    blob, start = parameters.tensors[1], HEAD + index * 256
    return [parameters.tensors[0], blob[:start] + value.to_bytes(256, "big") + blob[start + 256:]]


def _header(parameters: Parameters, **change: object) -> list[bytes]:
    return [json.dumps({**json.loads(parameters.tensors[0]), **change}).encode(), *parameters.tensors[1:]]


MALFORMED: dict[str, tuple[Callable[[dict, Parameters], list[bytes] | None], str]] = {
    "zero": (lambda k, p: _replace(k, p, 3, 0), r"parameters\[1\]\[3\]: outside \[1, n\^2\)"),
    "not below n^2": (lambda k, p: _replace(k, p, 5, k["site"].public_key.nsquare),
                      r"parameters\[1\]\[5\]: outside \[1, n\^2\)"),
    "not coprime": (lambda k, p: _replace(k, p, 7, k["site"].p * 12345),
                    r"parameters\[1\]\[7\]: not coprime to the modulus"),
    "truncated": (lambda k, p: _batch(p.tensors, lambda b: b[:-100]), r"parameters\[1\]: truncated"),
    "oversized": (lambda k, p: _batch(p.tensors, lambda b: b + bytes(256)), r"parameters\[1\]: \d+ bytes, more than"),
    "garbage": (lambda k, p: _batch(p.tensors, lambda b: b"x" * 1000), r"not a medsec Paillier batch"),
    "other key": (_other_key, r"parameters\[1\]: encrypted under another public key"),
    "count": (lambda k, p: _header(p, arrays=[*json.loads(p.tensors[0])["arrays"], {"shape": [120], "dtype": "float32"}]),
              r"parameters\[1\]: 200 ciphertexts, expected 210"),
    "batches": (lambda k, p: [*p.tensors, p.tensors[1]], r"2 tensors after the header"),
    "header json": (lambda k, p: [b"\xff{", *p.tensors[1:]], r"parameters\[0\]: not a medsec Paillier header"),
    "header format": (lambda k, p: _header(p, format="medsec-ckks/1"), r"format must be 'medsec-paillier/1'"),
    "examples mismatch": (lambda k, p: _header(p, examples=74), r"header says 74 examples, num_examples is 75"),
    "plain": (lambda k, p: None, r"plain parameters"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_ciphertexts_are_refused_naming_the_site(keys: dict, federated_round: dict, case: str) -> None:
    change, message = MALFORMED[case]
    replies = list(federated_round["replies"])
    res = replies[1][1]
    tensors = change(keys, res.parameters)
    parameters = (ndarrays_to_parameters(_arrays(2)) if tensors is None
                  else Parameters(tensors=tensors, tensor_type=PAILLIER_TENSOR_TYPE))
    replies[1] = (replies[1][0], FitRes(res.status, parameters, res.num_examples, res.metrics))
    with pytest.raises(DataError, match="site hospital-b") as caught:
        federated_round["server"].aggregate_fit(1, replies, [])
    assert caught.match(message)
    site = keys["site"]
    assert all(str(secret) not in str(caught.value) for secret in (site.p, site.q, site.public_key.n))


def test_too_many_examples_and_values_out_of_range_are_refused(keys: dict, federated_round: dict) -> None:
    replies = list(federated_round["replies"])
    res = replies[0][1]
    big = encrypt_parameters([np.zeros(3, np.float32)], 2**31, keys["site"])
    huge = [(replies[0][0], FitRes(res.status, big, 2**31, {})), (replies[1][0], FitRes(res.status, big, 2**31, {}))]
    with pytest.raises(DataError, match="more than the 4294967295 the Paillier sum carries"):
        federated_round["server"].aggregate_fit(1, huge, [])
    with pytest.raises(DataError, match=r"parameters\[1\]: must be finite and below 2\^24"):
        encrypt_parameters([np.array([1.0, np.nan], dtype=np.float32)], 3, keys["site"])
    with pytest.raises(DataError, match="2\\^32 or more"):
        encrypt_parameters([np.zeros(3)], 2**32, keys["site"])


def test_keys_stay_out_of_reprs_and_logs(keys: dict, federated_round: dict, caplog: pytest.LogCaptureFixture) -> None:
    site = keys["site"]
    caplog.set_level(logging.DEBUG)
    federated_round["server"].aggregate_fit(1, federated_round["replies"], [])
    texts = [repr(federated_round["server"]), repr(federated_round["mod"]), repr(paillier_mod(keys["path"])),
             caplog.text]
    for secret in (site.p, site.q, site.public_key.n):
        assert not any(str(secret) in text or hex(secret)[2:18] in text for text in texts)


def test_site_key_file_is_private_and_not_overwritten(keys: dict, tmp_path: Path) -> None:
    path = keys["path"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_site_key(path).p == keys["site"].p
    with pytest.raises(ConfigError, match="already exists"):
        make_site_key(path, 1024)
    public = tmp_path / "public.key"
    public.write_bytes(keys["public"])
    public.chmod(0o600)
    with pytest.raises(ConfigError, match="not a medsec Paillier private key"):
        load_site_key(public)
    public.chmod(0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_site_key(public)


def test_mod_from_a_path_loads_lazily_and_pickles_without_the_key(keys: dict, federated_round: dict) -> None:
    mod = paillier_mod(keys["path"])
    seen: list = []
    mod(instruction(MessageType.TRAIN, federated_round["aggregated"]), context(), client([], 1, seen))
    assert compare(seen[0], federated_round["plain"]) < 1e-6
    state = pickle.dumps(mod)
    assert len(state) < 1000 and hex(keys["site"].p)[2:].encode() not in state
    assert pickle.loads(state).key.p == keys["site"].p


def test_paillier_aggregation_plugs_in(tmp_path: Path) -> None:
    """`secure_aggregation=paillier` through `medsec federate`: the server only holds ciphertexts (no
    evaluation, no checkpoint); the sites decrypt and evaluate the global model."""
    make_site_key(tmp_path / "keys" / "site.key", 1024)
    (tmp_path / "keys" / "server.key").write_bytes(public_key(load_site_key(tmp_path / "keys" / "site.key")))
    start = time.perf_counter()
    result = run_verb("federate", ["data.source.image_size=24", "data.num_workers=0", "data.batch_size=32",
                                   "model.net.width=4", "data.source.num_samples=[96,32,32]",
                                   "federation.backend=inprocess", "federation.rounds=1",
                                   "federation.secure_aggregation=paillier",
                                   f"federation.paillier.site_key={tmp_path / 'keys' / 'site.key'}",
                                   f"federation.paillier.public_key={tmp_path / 'keys' / 'server.key'}"],
                      tmp_path / "run")
    print(f"\nmedsec federate, 3 sites, 1 round, Paillier 1024-bit: {time.perf_counter() - start:.1f} s")
    assert result["secure_aggregation"] == "paillier" and not result["refused"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cost_with_a_2048_bit_key() -> None:
    """Seconds and bytes per site and round for small_cnn(2, 1, 2, 8) under a 2048-bit key, vs plain."""
    _, site = generate_keypair(2048)
    arrays = site_arrays(1)
    start = time.perf_counter()
    encrypted = [encrypt_parameters(site_arrays(i + 1), n, site) for i, n in enumerate(EXAMPLES)]
    encrypt_s = (time.perf_counter() - start) / len(EXAMPLES)
    server = PaillierAggregation(FedAvg(), public_key(site))
    replies = [(SimpleNamespace(cid=s), FitRes(None, p, n, {})) for s, p, n in zip(SITES, encrypted, EXAMPLES)]
    start = time.perf_counter()
    aggregated, _ = server.aggregate_fit(1, replies, [])
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    decrypt_parameters(aggregated, site)
    decrypt_s = time.perf_counter() - start
    plain = ndarrays_to_parameters(arrays)
    start = time.perf_counter()
    aggregate([(site_arrays(i + 1), n) for i, n in enumerate(EXAMPLES)])
    plain_s = time.perf_counter() - start
    size, plain_size = sum(map(len, encrypted[0].tensors)), sum(map(len, plain.tensors))
    values = sum(a.size for a in arrays)
    print(f"\nPaillier 2048-bit, small_cnn(2,1,2,8) ({values} values, {(len(encrypted[0].tensors[1]) - HEAD) // 512} "
          f"ciphertexts): {size} bytes per update vs {plain_size} plain ({size / plain_size:.1f}x); encrypt "
          f"{encrypt_s:.2f} s per site, server adds 3 sites in {add_s:.3f} s (plain FedAvg {plain_s:.4f} s), "
          f"decrypt {decrypt_s:.2f} s")
    assert size / plain_size < 8
