"""`medsec serve` and untrusted ciphertexts and contexts: every SEAL/TenSEAL error is a 4xx naming
the field (never a 500), contexts must match the model card, latency requests are capped."""
from __future__ import annotations

import pytest
import tenseal as ts
from fastapi.testclient import TestClient
from tenseal import sealapi

from medsec.he import HEClient, HEInputError, HEServer, pack
from medsec.he.service import SESSION_HEADER, build_app
from medsec.he.testing import rescaled
from medsec.he.wire import ciphertext_to_bytes, load_ciphertext
from tests.he.tiny import tiny
from tests.security.serve_support import PRECISION, bomb_context, card, he_client, public_context, transparent

MIB = 1 << 20


@pytest.fixture(scope="module")
def http() -> TestClient:
    _, program, _ = tiny()
    return TestClient(build_app(program, PRECISION, max_request_bytes=64 * MIB, max_context_bytes=100 * MIB,
                                max_sessions=16, max_sessions_per_client=16, max_images_per_request=4),
                      raise_server_exceptions=False)


def session(http: TestClient, context: bytes) -> str:
    response = http.post("/context", content=context)
    assert response.status_code == 200, response.text
    return response.json()["session"]


@pytest.fixture(scope="module")
def throughput(http: TestClient) -> dict:
    client = he_client("throughput")
    return {"client": client, "session": session(http, public_context("throughput")),
            "blobs": client.encrypt(tiny()[2].numpy())}


def infer(http: TestClient, mode: str, sid: str, blobs: list[bytes]):
    return http.post(f"/infer/{mode}", content=pack(blobs), headers={SESSION_HEADER: sid})


def refused(response, status: int, field: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and text in body["error"], body
    assert "Traceback" not in response.text


def seal_context(client: HEClient) -> sealapi.SEALContext:
    return client.context.seal_context().data


def transparent_ciphertext(client: HEClient, blob: bytes) -> bytes:
    """``blob`` with its second component zeroed (:func:`medsec.he.testing.transparent`), checked to
    be what it claims: transparent, still in NTT form, at the top level and the right scale."""
    forged = transparent(client, blob)
    ciphertext = load_ciphertext(seal_context(client), forged)
    assert ciphertext.is_transparent() and ciphertext.is_ntt_form()
    assert ciphertext.scale == client.context.global_scale
    return forged


def unformatted(client: HEClient) -> bytes:
    """An all-zero ciphertext made with ``resize``: not in NTT form."""
    context = seal_context(client)
    ciphertext = sealapi.Ciphertext(context)
    ciphertext.resize(context, context.first_parms_id(), 2)
    ciphertext.scale = client.context.global_scale
    return ciphertext_to_bytes(ciphertext)


def test_transparent_ciphertext_is_a_422_naming_it(http: TestClient, throughput: dict) -> None:
    blobs = list(throughput["blobs"])
    blobs[3] = transparent_ciphertext(throughput["client"], blobs[3])
    refused(infer(http, "throughput", throughput["session"], blobs), 422, "ciphertexts[3]", "transparent")
    blobs = list(throughput["blobs"])
    blobs[2] = unformatted(throughput["client"])
    refused(infer(http, "throughput", throughput["session"], blobs), 422, "ciphertexts[2]")


@pytest.mark.parametrize("scale", [2.0 ** 45, 2.0 ** 26, 1.0, float("inf")])
def test_ciphertext_at_another_scale_is_a_422_naming_it(http: TestClient, throughput: dict, scale: float) -> None:
    blobs = list(throughput["blobs"])
    blobs[0] = rescaled(throughput["client"], blobs[0], scale)
    response = infer(http, "throughput", throughput["session"], blobs)
    assert response.status_code == 422, response.text
    assert response.json()["field"] in ("ciphertexts[0]", "ciphertexts")


def test_ciphertext_below_the_top_level_is_refused(http: TestClient, throughput: dict) -> None:
    client = throughput["client"]
    context = seal_context(client)
    ciphertext = load_ciphertext(context, throughput["blobs"][1])
    sealapi.Evaluator(context).mod_switch_to_next_inplace(ciphertext)
    blobs = list(throughput["blobs"])
    blobs[1] = ciphertext_to_bytes(ciphertext)
    refused(infer(http, "throughput", throughput["session"], blobs), 422, "ciphertexts[1]", "top level")


def test_context_with_another_scale_is_refused_naming_context(http: TestClient) -> None:
    client = HEClient(card(), "throughput")
    client.context.global_scale = 2.0 ** 45
    refused(http.post("/context", content=client.public_context()), 422, "context", "scale 2^45")


def test_context_without_a_scale_is_refused(http: TestClient) -> None:
    params = card().params["throughput"]
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    refused(http.post("/context", content=context.serialize(save_secret_key=False)), 422, "context", "scale")


def test_context_with_another_degree_or_chain_is_refused(http: TestClient) -> None:
    params = card().params["throughput"]
    assert params.poly_modulus_degree == 8192
    big = ts.context(ts.SCHEME_TYPE.CKKS, 16384, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    big.global_scale = 2.0 ** params.scale_bits
    refused(http.post("/context", content=big.serialize(save_secret_key=False)), 422, "context", "N=16384")
    chain = [30, 27, 27, 27, 27, 27, 50]  # valid at N=8192, not the card's
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=chain)
    other.global_scale = 2.0 ** params.scale_bits
    refused(http.post("/context", content=other.serialize(save_secret_key=False)), 422, "context", "chain")


def test_bfv_context_is_refused(http: TestClient) -> None:
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 8192, plain_modulus=1032193)
    refused(http.post("/context", content=bfv.serialize(save_secret_key=False)), 422, "context", "CKKS")


def test_card_check_on_the_server_object() -> None:
    _, program, _ = tiny()
    client = HEClient(card(), "throughput")
    client.context.global_scale = 2.0 ** 30
    with pytest.raises(HEInputError, match="context: .*scale 2\\^30"):
        HEServer(program, client.public_context(), card().params)


def test_latency_request_is_capped_in_images(http: TestClient) -> None:
    client = he_client("latency")
    sid = session(http, public_context("latency"))
    one = client.encrypt(tiny()[2][:1].numpy())
    refused(infer(http, "latency", sid, one * 5), 413, "ciphertexts", "limit is 4")
    response = infer(http, "latency", sid, one * 2)
    assert response.status_code == 200
    # the latency session also takes a transparent ciphertext as a 422, not a 500
    forged = transparent_ciphertext(client, one[0])
    refused(infer(http, "latency", sid, [forged]), 422, "ciphertexts[0]", "transparent")
    wrong = rescaled(client, one[0], 2.0 ** 40)
    refused(infer(http, "latency", sid, [wrong]), 422, "ciphertexts[0]", "scale")


def test_context_for_one_mode_is_refused_for_another(http: TestClient, throughput: dict) -> None:
    # the tiny card has the same parameters in both modes; the throughput context has no Galois keys
    response = infer(http, "latency", throughput["session"], throughput["blobs"][:1])
    refused(response, 422, "context", "Galois")


def test_seal_errors_during_evaluation_become_input_errors(throughput: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever SEAL throws during an evaluation is named ``ciphertexts`` (a 422), never escapes."""
    _, program, _ = tiny()
    server = HEServer(program, public_context("throughput"), card().params)

    def boom(*_args, **_kwargs):
        raise ValueError("scale out of bounds")

    monkeypatch.setattr(sealapi.Evaluator, "multiply_plain", boom)
    with pytest.raises(HEInputError, match="ciphertexts: the evaluation failed .*scale out of bounds"):
        server.evaluate("throughput", throughput["blobs"])


def test_unknown_paths_and_methods_answer_json(http: TestClient) -> None:
    refused(http.get("/nope"), 404, "path")
    refused(http.put("/model"), 405, "method")


def test_context_decompression_bomb_is_refused_before_tenseal_inflates_it(http: TestClient) -> None:
    """Relinearisation keys declaring 8192 key sets of zeros: about 7 MB on the wire, about 45 GB
    once SEAL had read them (a 180-set version, 160 KB, took an unguarded loader from 1.1 to 1.9
    GiB RSS, and loaded). The size is counted in a fixed buffer and refused past the limit."""
    import time

    from medsec.he.wire import inspect_context

    base = public_context("throughput")
    assert inspect_context(bomb_context(base, 1), 64 * MIB) == inspect_context(base, 64 * MIB)  # faithful rewrite
    bomb = bomb_context(base, 8192)
    assert len(bomb) < 8 * MIB
    start = time.perf_counter()
    with pytest.raises(HEInputError, match="context: its keys take more than 67108864 bytes once decompressed"):
        inspect_context(bomb, 64 * MIB)
    assert time.perf_counter() - start < 5
    # through the service (limit: twice max_context_bytes = 200 MiB); 300 sets would be 1.6 GB
    refused(http.post("/context", content=bomb_context(base, 300)), 422, "context", "once decompressed")


def test_secret_key_is_refused_before_the_context_is_parsed() -> None:
    from medsec.he import SecretKeyRefused
    from medsec.he.wire import inspect_context

    secret = he_client("throughput").context.serialize(save_secret_key=True, save_galois_keys=False)
    with pytest.raises(SecretKeyRefused, match="context: holds a secret key"):
        inspect_context(secret, 64 * MIB)


def test_a_bug_is_a_json_500_without_traceback(http: TestClient, throughput: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: an unexpected exception (a bug, not input) is logged on the server and
    answered with a generic JSON 500 that says nothing about the code."""
    def bug(*_args, **_kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(HEServer, "evaluate", bug)
    response = infer(http, "throughput", throughput["session"], throughput["blobs"])
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; the server log says more", "field": None}
    assert "internal detail" not in response.text and "Traceback" not in response.text
