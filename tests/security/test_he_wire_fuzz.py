"""Fuzzing the server side of the HE wire format: corrupted and truncated packed batches, public
contexts and ciphertexts (compressed as clients send them, and rewritten uncompressed so that the
corruptions reach SEAL's own parsing) must give HEInputError or SecretKeyRefused, a clear error
naming the field, or load as a well-formed object; never another exception type (and never a
crash)."""
from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec.he import HEInputError, HEServer, SecretKeyRefused, pack, unpack
from medsec.he.wire import ciphertext_from_bytes, inspect_context, load_public_context
from tests.he.tiny import tiny
from tests.security.serve_support import card, he_client, public_context, seal_object, uncompressed

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAR = (HEInputError, SecretKeyRefused)


@st.composite
def corrupted(draw: st.DrawFn, data: bytes, hot: int = 256) -> bytes:
    """``data`` with one or a few corruptions: bit flips, overwritten runs, inserted or deleted
    bytes, a truncation. Half the positions fall in the first ``hot`` bytes (headers, metadata)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        limit = min(len(out), hot) if draw(st.booleans()) else len(out)
        at = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            run = draw(st.binary(min_size=1, max_size=16))
            out[at:at + len(run)] = run
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        else:
            del out[at:]
    return bytes(out)


@functools.cache
def ciphertexts() -> dict[str, bytes]:
    """One throughput ciphertext as a client sends it (zstd) and the same one uncompressed."""
    blob = he_client("throughput").encrypt(tiny()[2].numpy())[0]
    return {"zstd": blob, "raw": seal_object(*uncompressed(blob))}


@functools.cache
def contexts() -> dict[str, bytes]:
    client = he_client("throughput")
    return {"public": public_context("throughput"),
            "secret": client.context.serialize(save_secret_key=True, save_galois_keys=False)}


@FUZZ
@given(blobs=st.lists(st.binary(max_size=48), max_size=6), data=st.data())
def test_unpack_of_corrupted_batches(blobs: list[bytes], data: st.DataObject) -> None:
    packed = data.draw(corrupted(pack(blobs)))
    try:
        out = unpack(packed)
    except HEInputError as err:
        assert err.field.startswith("ciphertexts")
    else:
        assert pack(out) == packed


@FUZZ
@given(raw=st.binary(max_size=256))
def test_unpack_of_random_bytes(raw: bytes) -> None:
    try:
        unpack(raw, "response")
    except HEInputError as err:
        assert err.field.startswith("response")


@FUZZ
@given(which=st.sampled_from(["public", "secret"]), guard=st.sampled_from([None, 64 << 20]), data=st.data())
def test_load_public_context_of_corrupted_contexts(which: str, guard: int | None, data: st.DataObject) -> None:
    blob = data.draw(corrupted(contexts()[which]))
    try:
        context = load_public_context(blob, card().params, guard)
    except CLEAR as err:
        assert "context" in str(err)
    else:
        assert not context.has_secret_key()


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_heserver_of_corrupted_contexts(data: st.DataObject) -> None:
    blob = data.draw(corrupted(contexts()["public"]))
    try:
        HEServer(tiny()[1], blob, card().params, 64 << 20)
    except CLEAR as err:
        assert "context" in str(err)


@FUZZ
@given(data=st.data())
def test_inspect_context_of_corrupted_contexts(data: st.DataObject) -> None:
    """The pre-parse (protobuf fields, SEAL headers, zstd streams) of corrupted public contexts."""
    blob = data.draw(corrupted(contexts()["public"], hot=512))
    try:
        assert inspect_context(blob, 64 << 20) >= 0
    except CLEAR as err:
        assert "context" in str(err)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_inspect_context_of_random_bytes(raw: bytes) -> None:
    try:
        inspect_context(raw, 1 << 20)
    except CLEAR as err:
        assert "context" in str(err)


@FUZZ
@given(form=st.sampled_from(["zstd", "raw"]), data=st.data())
def test_ciphertext_from_bytes_of_corrupted_ciphertexts(form: str, data: st.DataObject) -> None:
    context = he_client("throughput").context  # the server would hold the public one; same parameters
    blob = data.draw(corrupted(ciphertexts()[form], hot=128))
    try:
        ciphertext_from_bytes(context, blob, "ciphertexts[7]")
    except HEInputError as err:
        assert err.field == "ciphertexts[7]"


@pytest.fixture(scope="module")
def latency_server() -> HEServer:
    return HEServer(tiny()[1], public_context("latency"), card().params)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_latency_evaluation_of_corrupted_ciphertexts(latency_server: HEServer, data: st.DataObject) -> None:
    """Through the whole evaluation: a ciphertext that loads must be evaluated or refused clearly."""
    blob = he_client("latency").encrypt(tiny()[2][:1].numpy())[0]
    raw = data.draw(corrupted(seal_object(*uncompressed(blob)), hot=128))
    try:
        out = latency_server.evaluate("latency", [raw])
    except HEInputError as err:
        assert err.field.startswith("ciphertexts")
    else:
        assert len(out) == 1
