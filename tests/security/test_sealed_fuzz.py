"""Fuzzing sealed files: any corruption or truncation of the magic, header length, JSON header or
envelope gives a clear medsec error (or, for a change the format cannot see, the original bytes),
never another exception."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec.errors import MedsecError
from medsec.protections import KeyRef, SecretKey
from medsec.protections.aes import SEALED_MAGIC, open_sealed_bytes, seal_file_bytes
from medsec.protections.keys import write_key_file

NAME, RUN = "predictions/case_7.nii.gz.enc", "0123456789abcdef0123456789abcdef"
PLAINTEXT = b"label map " * 40


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyRef, bytes]:
    key_file = write_key_file(tmp_path_factory.mktemp("k") / "sealed.key", SecretKey.generate())
    ref = KeyRef(file=str(key_file))
    return ref, seal_file_bytes(PLAINTEXT, ref, "output", name=NAME, run_id=RUN)


def opens_or_refuses(ref: KeyRef, blob: bytes) -> None:
    try:
        assert open_sealed_bytes(blob, ref, "output", "sealed file f", name=NAME, run_id=RUN) == PLAINTEXT
    except MedsecError as err:
        assert "sealed file f" in str(err)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_flipped_bytes_are_refused(sealed: tuple[KeyRef, bytes], data: st.DataObject) -> None:
    ref, blob = sealed
    damaged = bytearray(blob)
    for index in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4)):
        damaged[index] ^= data.draw(st.integers(1, 255))
    opens_or_refuses(ref, bytes(damaged))


@FUZZ
@given(cut=st.integers(0, 10_000), tail=st.binary(max_size=64))
def test_truncated_or_extended_files_are_refused(sealed: tuple[KeyRef, bytes], cut: int, tail: bytes) -> None:
    ref, blob = sealed
    opens_or_refuses(ref, blob[: cut % (len(blob) + 1)] + tail)


HEADER_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                          st.text(max_size=20), st.lists(st.integers(), max_size=3),
                          st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@FUZZ
@given(field=st.sampled_from(["key_id", "kdf", "purpose", "bits", "name", "run", "extra"]), value=HEADER_VALUES,
       drop=st.booleans())
def test_edited_headers_are_refused(sealed: tuple[KeyRef, bytes], field: str, value: object, drop: bool) -> None:
    ref, blob = sealed
    start = len(SEALED_MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(SEALED_MAGIC):start])
    header = json.loads(blob[start:start + length])
    if drop:
        header.pop(field, None)
    else:
        header[field] = value
    body = json.dumps(header).encode()
    opens_or_refuses(ref, SEALED_MAGIC + struct.pack(">I", len(body)) + body + blob[start + length:])


@pytest.mark.parametrize("length", [0, 5, 2**31, 2**32 - 1])
def test_absurd_header_lengths_are_refused_without_allocation(sealed: tuple[KeyRef, bytes], length: int) -> None:
    ref, blob = sealed
    with pytest.raises(MedsecError, match="sealed file f has a damaged header"):
        open_sealed_bytes(SEALED_MAGIC + struct.pack(">I", length) + b"{}", ref, "output", "sealed file f", name=NAME,
                          run_id=RUN)


def test_the_kdf_of_a_sealed_file_is_bounded_before_derivation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDSEC_PASSPHRASE", "correct horse battery staple")
    ref = KeyRef(source="passphrase")
    blob = seal_file_bytes(PLAINTEXT, ref, "output", name=NAME, run_id=RUN)
    start = len(SEALED_MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(SEALED_MAGIC):start])
    header = json.loads(blob[start:start + length])
    header["kdf"]["p"] = 256  # 45 s of scrypt if it were run
    body = json.dumps(header).encode()
    with pytest.raises(MedsecError, match="'p'"):
        open_sealed_bytes(SEALED_MAGIC + struct.pack(">I", len(body)) + body + blob[start + length:], ref, "output",
                          "sealed file f", name=NAME, run_id=RUN)
