"""Untrusted store bytes: whatever is done to ``records.bin``, ``manifest.json``, ``manifest.mac`` or
``CURRENT``, opening and reading a store either gives back the original records or raises a
:mod:`medsec.errors` error naming the store or record, never another exception. Decrypted records
that authenticate but are malformed fail cleanly too, without allocating from an unchecked size.

The stores are tiny and the examples bounded, so this runs in seconds.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec.errors import DataError, MedsecError
from medsec.protections import store as store_module
from medsec.protections.keys import KeyRef, SecretKey, read_key_file, write_key_file
from medsec.protections.store import (
    ARRAY_FIELDS,
    CURRENT,
    MAC,
    MANIFEST,
    RECORDS,
    RecordStore,
    _manifest_mac,
    decode_record,
    encode_record,
    live_dir,
    write_store,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RECORDS_IN = {
    "train": [{"id": "patient-1", "image": np.arange(12, dtype=np.uint8).reshape(1, 3, 4), "label": 1},
              {"id": "patient-2", "image": np.ones((1, 2, 2), np.float32), "mask": np.zeros((1, 2, 2), np.int64),
               "label": [0.0, 1.0]}],
    "val": [{"id": "patient-3", "image": np.full((1, 2, 3), 7, np.int16), "label": 0}],
    "test": [],
}
DESCRIPTION = {"class_names": ["no", "yes"], "multilabel": False, "spatial_dims": 2}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    key_file = write_key_file(root / "keys" / "fuzz.key", SecretKey.generate())  # hex key: no scrypt per example
    key_ref = KeyRef(source="file", file=str(key_file))
    path = write_store(root / "template", RECORDS_IN, dataset_id="fuzz", description=DESCRIPTION, key_ref=key_ref)
    files = live_dir(path)
    return {"root": root, "path": path, "key_ref": key_ref, "key": read_key_file(key_file),
            "manifest": (files / MANIFEST).read_bytes(), "mac": (files / MAC).read_bytes(),
            "records": (files / RECORDS).read_bytes()}


def fresh_copy(template: dict[str, Any]) -> Path:
    path = Path(tempfile.mkdtemp(dir=template["root"])) / "store"
    shutil.copytree(template["path"], path)
    return path


def open_and_read_all(path: Path, key_ref: KeyRef) -> str:
    """``"ok"`` if every record reads back as written; ``"refused"`` for a medsec error that names
    the store. Any other exception, or a record that reads back different, fails the test."""
    try:
        store = RecordStore(path, key_ref)
        for split, records in RECORDS_IN.items():
            assert len(store.records[split]) == len(records)
            for index, expected in enumerate(records):
                record = store.read(split, index)
                assert record["id"] == expected["id"]
                assert np.array_equal(np.asarray(record["label"]), np.asarray(expected["label"]))
                for name in ("image", "mask"):
                    if name in expected:
                        assert record[name].dtype == expected[name].dtype
                        assert np.array_equal(record[name], expected[name])
        differ = store.verify_digests()
        store.close()
    except MedsecError as err:
        assert str(path) in str(err), f"the error does not name the store: {err}"
        return "refused"
    return "ok" if not differ else "digests differ"  # (a key holder wrote wrong digests: verify names them)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= value[0] or 1
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = value
        elif kind == "overwrite":
            out[at:at + len(value)] = value
    return bytes(out)


byte_edits = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite"]),
                                st.integers(0, 10**6), st.binary(min_size=1, max_size=12)), min_size=1, max_size=4)


@pytest.mark.parametrize(("name", "part"), [(RECORDS, "records"), (MANIFEST, "manifest")])
@FUZZ
@given(edits=byte_edits)
def test_damaged_store_file(template: dict[str, Any], name: str, part: str, edits: list) -> None:
    path = fresh_copy(template)
    original = template[part]
    damaged = mutate(original, edits)
    (live_dir(path) / name).write_bytes(damaged)
    # bytes after the last record are never read; the manifest is read whole
    intact = damaged[:len(original)] == original if part == "records" else damaged == original
    assert open_and_read_all(path, template["key_ref"]) == ("ok" if intact else "refused")


@FUZZ
@given(mac=st.one_of(st.binary(max_size=300), byte_edits.map(lambda e: e)))
def test_damaged_mac(template: dict[str, Any], mac: Any) -> None:
    path = fresh_copy(template)
    damaged = mac if isinstance(mac, bytes) else mutate(template["mac"], mac)
    (live_dir(path) / MAC).write_bytes(damaged)
    same = damaged.strip() == template["mac"].strip()
    assert open_and_read_all(path, template["key_ref"]) == ("ok" if same else "refused")


@FUZZ
@given(content=st.one_of(st.binary(max_size=40), st.sampled_from([b"v1", b" v1\n", b"v2\n", b"v0\n", b"..\n", b"/\n"])),
       missing=st.sampled_from([None, MANIFEST, MAC, RECORDS, "v1"]))
def test_damaged_current_or_missing_files(template: dict[str, Any], content: bytes, missing: str | None) -> None:
    path = fresh_copy(template)
    (path / CURRENT).write_bytes(content)
    if missing == "v1":
        shutil.rmtree(path / "v1")
    elif missing:
        (path / "v1" / missing).unlink()
    whole = content.strip() == b"v1" and missing is None
    assert open_and_read_all(path, template["key_ref"]) == ("ok" if whole else "refused")


nasty = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=8).map(bytes.hex),
    st.lists(st.integers(-5, 10**12), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.just([[-1, 10**20, "x"]]), st.just({"name": "scrypt"}),
)
TOP_FIELDS = ["format", "version", "dataset_id", "algorithm", "bits", "key_id", "kdf", "records", "sealed", "created"]


@st.composite
def manifest_edits(draw: st.DrawFn) -> list[tuple[list, Any]]:
    """Edits as (path into the manifest, value); the value ``...`` deletes."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        value = draw(st.one_of(nasty, st.just(...)))
        target = draw(st.sampled_from(["top", "split", "entry", "field", "kdf", "beyond"]))
        split = draw(st.sampled_from(["train", "val", "test"]))
        if target == "top":
            edits.append(([draw(st.sampled_from(TOP_FIELDS))], value))
        elif target == "split":
            edits.append((["records", split], value))
        elif target == "entry":
            edits.append((["records", "train", draw(st.integers(0, 1))], value))
        elif target == "field":
            edits.append((["records", "train", draw(st.integers(0, 1)), draw(st.integers(0, 2))], value))
        elif target == "kdf":
            kdf = {"name": "scrypt", "salt": "00" * 16, "n": 2**14, "r": 8, "p": 1}
            kdf[draw(st.sampled_from(sorted(kdf)))] = value
            edits.append((["kdf"], {k: v for k, v in kdf.items() if v is not ...}))
        else:  # offset + length beyond the end of records.bin
            edits.append((["records", "val", 0, 0], draw(st.integers(1, 2**64))))
    return edits


def apply_edit(manifest: dict, keys: list, value: Any) -> None:
    node = manifest
    for key in keys[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if value is ...:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


@FUZZ
@given(edits=manifest_edits(), re_mac=st.booleans())
def test_edited_manifest_fields(template: dict[str, Any], edits: list, re_mac: bool) -> None:
    """Wrong types, huge numbers, negative offsets, missing fields, records beyond the file: with the
    old MAC (an outsider) and with a recomputed one (a key holder's bug, or the checks after the MAC)."""
    path = fresh_copy(template)
    manifest = json.loads(template["manifest"])
    for keys, value in edits:
        apply_edit(manifest, keys, value)
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    files = live_dir(path)
    (files / MANIFEST).write_bytes(body)
    if re_mac:
        (files / MAC).write_text(_manifest_mac(template["key"], manifest.get("dataset_id"), body) + "\n")
    outcome = open_and_read_all(path, template["key_ref"])
    if not re_mac and body != template["manifest"]:
        assert outcome == "refused"


def test_kdf_is_checked_before_any_key_is_derived(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUZZ_PASS", "a passphrase for the fuzz test")
    key_ref = KeyRef(source="passphrase", passphrase_env="FUZZ_PASS")
    path = write_store(tmp_path / "s", RECORDS_IN, dataset_id="fuzz", description=DESCRIPTION, key_ref=key_ref)
    files = live_dir(path)
    original = json.loads((files / MANIFEST).read_text())
    loads = []
    real_load = KeyRef.load
    monkeypatch.setattr(KeyRef, "load", lambda self, kdf=None: loads.append(kdf) or real_load(self, kdf))
    good = original["kdf"]
    bad = ["scrypt", [], 2**15, {"name": "scrypt"}, {**good, "n": "32768"}, {**good, "n": True}, {**good, "n": -2},
           {**good, "n": 3}, {**good, "r": 1.5}, {**good, "p": 0}, {**good, "p": None}, {**good, "salt": "zz" * 16},
           {**good, "salt": 10**30}, {**good, "salt": "00"}, {**good, "name": "argon2"}, {**good, "extra": 1}, None]
    for kdf in bad:
        (files / MANIFEST).write_text(json.dumps({**original, "kdf": kdf}))
        with pytest.raises(DataError, match=f"store {path}: manifest.json field 'kdf' .*damaged or was tampered"):
            RecordStore(path, key_ref)
    assert loads == []  # refused before anything was derived
    (files / MANIFEST).write_text(json.dumps({**original, "kdf": {**good, "n": 2**40}}))  # 128 TiB of memory
    with pytest.raises(MedsecError, match=f"store {path}.*'kdf'"):
        RecordStore(path, key_ref)

    def out_of_memory(self: KeyRef, kdf: Any = None) -> None:
        raise MemoryError
    monkeypatch.setattr(KeyRef, "load", out_of_memory)
    (files / MANIFEST).write_text(json.dumps(original, indent=1, sort_keys=True))
    with pytest.raises(DataError, match=f"store {path} .*'kdf'.*more memory than there is"):
        RecordStore(path, key_ref)


def test_kdf_is_type_checked_for_key_file_stores_too(template: dict[str, Any]) -> None:
    """The kdf field is type-checked even when the key does not need it."""
    path = fresh_copy(template)
    files = live_dir(path)
    (files / MANIFEST).write_text(json.dumps({**json.loads(template["manifest"]), "kdf": {"n": [1]}}))
    with pytest.raises(DataError, match="field 'kdf'"):
        RecordStore(path, template["key_ref"])


# ---- decrypted, authenticated, malformed ------------------------------------------------------
dtypes = st.one_of(
    st.sampled_from(["|u1", "<f4", ">f8", "<i8", "|b1", "<c8", "<f2", "O", "|O", "<U4", "|S3", "|V8", "<M8[s]",
                     "[('a','O')]", "f16", "i3", "u0", "<f0"]),
    st.text(max_size=8), nasty)
shapes = st.one_of(st.lists(st.integers(-3, 6), max_size=4),
                   st.lists(st.sampled_from([0, 1, 2**31, 2**40, 2**62, 2**64, 10**20]), min_size=1, max_size=9), nasty)
array_entries = st.one_of(st.tuples(st.sampled_from([*ARRAY_FIELDS, "junk"]), dtypes, shapes).map(list), nasty)
headers = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=6), nasty), "label": nasty, "arrays": st.one_of(st.lists(array_entries, max_size=3), nasty)},
    optional={"extra": nasty})


@settings(max_examples=100, deadline=None)
@given(header=st.one_of(headers, nasty), payload=st.binary(max_size=64), lie=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_decode_record_malformed(header: Any, payload: bytes, lie: int | None) -> None:
    head = json.dumps(header).encode()
    data = struct.pack(">I", len(head) if lie is None else lie) + head + payload
    tracemalloc.start()
    try:
        record = decode_record(data, "record 9 of split 'train' in store S")
    except DataError as err:
        assert "record 9 of split 'train' in store S is malformed" in str(err)
    else:
        assert sum(np.asarray(record[k]).nbytes for k in ("image", "mask") if k in record) <= len(payload)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 << 20  # nothing sized by the header's numbers


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=80))
def test_decode_record_random_bytes(data: bytes) -> None:
    with pytest.raises(DataError, match="is malformed"):
        decode_record(data, "a record")


def test_decode_record_refuses_object_dtypes_and_huge_shapes() -> None:
    def record(arrays: list, payload: bytes = b"\0" * 16) -> bytes:
        head = json.dumps({"id": "x", "label": 0, "arrays": arrays}).encode()
        return struct.pack(">I", len(head)) + head + payload

    for dtype in ("O", "|O", "<U4", "|S4", "|V8", "<M8[s]"):
        with pytest.raises(DataError, match="not a plain numeric dtype"):
            decode_record(record([["image", dtype, [2]]]))
    with pytest.raises(DataError, match="needs 8796093022208 bytes, 16 are left"):
        decode_record(record([["image", "|u1", [2**40, 8]]]))
    with pytest.raises(DataError, match="needs .* bytes, 16 are left"):
        decode_record(record([["image", "<f8", [2**62, 2**62, 2**62]]]))  # would overflow int64
    with pytest.raises(DataError, match="8 bytes follow its last array"):
        decode_record(record([["image", "|u1", [8]]]))
    with pytest.raises(DataError, match="unknown or repeated array 'image'"):
        decode_record(record([["image", "|u1", [8]], ["image", "|u1", [8]]]))
    with pytest.raises(DataError, match="affine"):
        decode_record(record([["image", "|u1", [8]], ["affine", "|u1", [8]]]))
    with pytest.raises(DataError, match="object|numeric"):
        encode_record({"id": "x", "image": np.array([{"a": 1}], dtype=object)})
    big_endian = decode_record(record([["image", ">u4", [2, 2]]], (1).to_bytes(4, "big") * 4))
    assert big_endian["image"].dtype == np.dtype("=u4") and big_endian["image"].tolist() == [[1, 1], [1, 1]]


def test_an_authenticated_malformed_record_is_named(tmp_path: Path, key_ref: KeyRef,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A record that passes AES-GCM (written by a key holder) but does not decode: DataError naming it."""
    head = json.dumps({"id": "r0", "label": 0, "arrays": [["image", "|O", [1]]]}).encode()
    monkeypatch.setattr(store_module, "encode_record", lambda record: struct.pack(">I", len(head)) + head + b"\0" * 8)
    path = write_store(tmp_path / "s", {"train": [{"id": "r0"}], "val": [], "test": []}, dataset_id="m",
                       description={}, key_ref=key_ref)
    with pytest.raises(DataError, match=rf"record 0 of split 'train' \(id 'r0'\) in store {path} is malformed: "
                                        "array 'image' has dtype '|O'"):
        RecordStore(path, key_ref).read("train", 0)


@pytest.fixture
def key_ref(tmp_path: Path) -> KeyRef:
    return KeyRef(source="file", file=str(write_key_file(tmp_path / "keys" / "k.key", SecretKey.generate())))
