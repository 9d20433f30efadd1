"""The encrypted record store: round trips on every source, and every way a store can be damaged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec.commands.encrypt import encrypt_source
from medsec.data import MedicalDataModule
from medsec.data.sources import ChestXray14Source, FolderSource, MedMNISTSource
from medsec.data.sources.base import DataSource
from medsec.data.sources.synthetic import SyntheticSource
from medsec.data.transforms import LoadImageNamed
from medsec.errors import ConfigError, DataError, SecurityError
from medsec.protections import AESStage, KeyRef, SecretKey
from medsec.protections.keys import write_key_file
from medsec.protections.store import (
    MANIFEST,
    RECORDS,
    EncryptedSource,
    RecordStore,
    decode_record,
    encode_record,
    live_dir,
    write_store,
)
from tests.data.fakes import make_class_folders, nih_rows, write_nih, write_npz


def batches(source: DataSource, image_size: int | None = None, **kwargs) -> list[dict]:
    """Every item of every split, as the training pipeline gives it."""
    dm = MedicalDataModule(source, batch_size=8, num_workers=0, image_size=image_size, augment=False, **kwargs)
    dm.setup()
    return [dm.datasets[split][i] for split in ("train", "val", "test") for i in range(len(dm.datasets[split]))]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["id"] == y["id"]
        for key in x.keys() - {"id"}:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


SOURCES = {
    "synthetic2d": lambda root: SyntheticSource(num_samples=(12, 4, 4), image_size=16),
    "synthetic3d_multilabel": lambda root: SyntheticSource(num_samples=(6, 3, 3), image_size=12, spatial_dims=3,
                                                           num_classes=2, multilabel=True),
    "medmnist": lambda root: MedMNISTSource("pneumoniamnist", root=str(write_npz(root / "p.npz").parent),
                                            file=str(root / "p.npz"), download=False),
    "chestxray14": lambda root: ChestXray14Source(str(root / "nih"), csv=str(write_nih(root / "nih", nih_rows(6)))),
    "folder": lambda root: (make_class_folders(root / "folder", per_class=4), FolderSource(str(root / "folder")))[1],
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_round_trip_gives_the_same_batches(name: str, tmp_path: Path, stage: AESStage) -> None:
    source = SOURCES[name](tmp_path)
    path = encrypt_source(source, stage)
    assert path == tmp_path / "stores" / source.dataset_id
    size = 8 if name in ("chestxray14", "folder") else None
    assert_same_batches(batches(source, size), batches(stage.wrap_source(source), size))
    assert_same_batches(batches(source, size), batches(stage.wrap_source(source), size, cache=False))
    manifest = json.loads((live_dir(path) / MANIFEST).read_text())
    assert manifest["key_id"] == stage.key.load().key_id and manifest["algorithm"] == "AES-256-GCM"
    assert stage.key.load().export_hex() not in (live_dir(path) / MANIFEST).read_text()
    some_id = source.load().splits["test"][0]["id"]
    assert some_id not in (live_dir(path) / MANIFEST).read_text()  # ids (NIH names carry patient numbers) are sealed
    assert RecordStore(path, stage.key).records["test"][0][0] == some_id


def test_files_keep_their_dtype_and_affine(tmp_path: Path, stage: AESStage) -> None:
    source = SOURCES["folder"](tmp_path)
    store = RecordStore(encrypt_source(source, stage), stage.key)
    split, index = next((s, i) for s, i, e in store.entries() if e[0].endswith(".nii.gz"))
    record = store.read(split, index)
    assert record["image"].dtype == torch.float32 and record["image"].affine.shape == (4, 4)
    dicom = next(store.read(s, i) for s, i, e in store.entries() if e[0].endswith(".dcm"))
    direct = LoadImageNamed("image")({"image": str(tmp_path / "folder" / "zz_dicom" / "d0.dcm")})["image"]
    assert dicom["image"].dtype == direct.dtype and torch.equal(dicom["image"], direct)


@pytest.fixture
def store(tmp_path: Path, stage: AESStage) -> RecordStore:
    return RecordStore(encrypt_source(SyntheticSource(num_samples=(6, 3, 3), image_size=12), stage), stage.key)


def test_one_flipped_byte_names_the_record(store: RecordStore) -> None:
    _, offset, length, _ = store.records["val"][1]
    data = bytearray((store.files / RECORDS).read_bytes())
    data[offset + length // 2] ^= 0x01
    (store.files / RECORDS).write_bytes(bytes(data))
    with pytest.raises(SecurityError, match=r"record 1 of split 'val' \(id 'synthetic-val-000001'\) .* failed authentication"):
        store.read("val", 1)
    assert store.read("val", 0)["id"] == "synthetic-val-000000"  # the others are intact
    assert store.verify_digests() == [store.describe("val", 1)]


def test_swapped_records_are_detected(store: RecordStore) -> None:
    (_, a, n, _), (_, b, m, _) = store.records["train"][0], store.records["train"][1]
    assert n == m
    data = bytearray((store.files / RECORDS).read_bytes())
    data[a:a + n], data[b:b + n] = data[b:b + n], data[a:a + n]
    (store.files / RECORDS).write_bytes(bytes(data))
    with pytest.raises(SecurityError, match=r"record 0 of split 'train' \(id 'synthetic-train-000000'\)"):
        store.read("train", 0)


def test_edited_manifest_is_refused(store: RecordStore, key_ref: KeyRef) -> None:
    manifest = json.loads((store.files / MANIFEST).read_text())
    manifest["records"]["test"], manifest["records"]["val"] = manifest["records"]["val"], manifest["records"]["test"]
    (store.files / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(SecurityError, match="manifest of store .* failed authentication"):
        RecordStore(store.path, key_ref)


def test_truncated_store_names_the_first_missing_record(store: RecordStore, key_ref: KeyRef) -> None:
    records = store.files / RECORDS
    _, offset, _, _ = store.records["test"][2]
    records.write_bytes(records.read_bytes()[:offset + 5])
    with pytest.raises(SecurityError, match=r"record 2 of split 'test' .* is truncated"):
        RecordStore(store.path, key_ref)


def test_wrong_key_is_named(store: RecordStore, tmp_path: Path) -> None:
    other = KeyRef(file=str(write_key_file(tmp_path / "other.key", SecretKey.generate())))
    with pytest.raises(SecurityError, match=r"encrypted under key id \w{16}, but key file .*other.key has key id \w{16}: wrong key"):
        RecordStore(store.path, other)


def test_store_of_another_dataset_is_refused(store: RecordStore, stage: AESStage) -> None:
    other = SyntheticSource(num_samples=(6, 3, 3), image_size=12, seed=1)
    with pytest.raises(SecurityError, match=f"holds data set '{store.dataset_id}', but the data config describes '{other.dataset_id}'"):
        EncryptedSource(store.path, stage.key, expect_dataset_id=other.dataset_id).load()


def test_existing_store_is_not_overwritten_and_missing_one_is_named(store: RecordStore, stage: AESStage, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        encrypt_source(SyntheticSource(num_samples=(6, 3, 3), image_size=12), stage)
    with pytest.raises(DataError, match="encrypted store not found: .*nowhere.*medsec encrypt"):
        EncryptedSource(tmp_path / "nowhere", stage.key).load()


def test_interrupted_write_leaves_nothing_that_loads(tmp_path: Path, stage: AESStage) -> None:
    def records():
        yield {"id": "a", "image": np.zeros((1, 4, 4), np.uint8), "label": 0}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", {"train": records(), "val": [], "test": []}, dataset_id="d",
                    description={}, key_ref=stage.key)
    assert list(tmp_path.iterdir()) == [tmp_path / "keys"]  # no store, no temporary directory
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / MANIFEST).write_text("{}")
    with pytest.raises(DataError, match="is incomplete .*manifest.mac.*records.bin"):
        RecordStore(tmp_path / "half", stage.key)


def test_passphrase_store_and_aes128(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PASS", "a long passphrase for the test")
    stage = AESStage(key={"source": "passphrase", "passphrase_env": "TEST_PASS"}, store_root=tmp_path, bits=128)
    source = SyntheticSource(num_samples=(4, 2, 2), image_size=12)
    path = encrypt_source(source, stage)
    manifest = json.loads((live_dir(path) / MANIFEST).read_text())
    assert manifest["algorithm"] == "AES-128-GCM" and manifest["kdf"]["name"] == "scrypt"
    assert_same_batches(batches(source), batches(stage.wrap_source(source)))
    monkeypatch.setenv("TEST_PASS", "another passphrase")
    with pytest.raises(SecurityError, match="wrong key"):
        stage.wrap_source(source).load()


def test_store_files_hold_no_plaintext(tmp_path: Path, stage: AESStage) -> None:
    source = SOURCES["medmnist"](tmp_path)
    path = encrypt_source(source, stage)
    image = source.load().splits["train"][0]["image"].tobytes()
    blob = b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())
    assert image[100:164] not in blob


arrays = st.builds(
    lambda shape, dtype, seed: np.random.default_rng(seed).integers(0, 200, shape).astype(dtype),
    st.lists(st.integers(1, 5), min_size=2, max_size=4), st.sampled_from(["uint8", "uint16", "float32", "int64"]),
    st.integers(0, 2**16))
record_strategy = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=12), "image": arrays,
     "label": st.one_of(st.integers(0, 9), st.lists(st.sampled_from([0.0, 1.0, -1.0]), min_size=1, max_size=5))},
    optional={"mask": arrays})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record_strategy, min_size=1, max_size=4), flip=st.integers(0, 10**6), cut=st.integers(0, 10**6))
def test_property_round_trip_and_any_corruption(tmp_path: Path, key_ref: KeyRef, records, flip: int, cut: int) -> None:
    for record in records:
        decoded = decode_record(encode_record(record))
        assert decoded["id"] == record["id"] and np.array_equal(decoded["image"], record["image"])
        assert decoded["image"].dtype == record["image"].dtype
        assert np.array_equal(np.asarray(decoded["label"]), np.asarray(record["label"], dtype=np.asarray(decoded["label"]).dtype))
    path = tmp_path / f"s{flip}-{cut}"
    shutil.rmtree(path, ignore_errors=True)
    write_store(path, {"train": records, "val": [], "test": []}, dataset_id="prop", description={}, key_ref=key_ref)
    store = RecordStore(path, key_ref)
    assert [store.read("train", i)["id"] for i in range(len(records))] == [r["id"] for r in records]
    data = bytearray((store.files / RECORDS).read_bytes())
    position = flip % len(data)
    data[position] ^= 1 << (cut % 8)
    (store.files / RECORDS).write_bytes(bytes(data))
    damaged = next(i for i, entry in enumerate(store.records["train"]) if entry[1] <= position < entry[1] + entry[2])
    for i in range(len(records)):
        if i == damaged:
            with pytest.raises(SecurityError, match=f"record {i} of split 'train'"):
                store.read("train", i)
        else:
            assert np.array_equal(store.read("train", i)["image"], records[i]["image"])
    (store.files / RECORDS).write_bytes(bytes(data[: cut % len(data)]))
    with pytest.raises(SecurityError, match="is truncated"):
        RecordStore(path, key_ref)


def test_cache_decrypts_once_in_memory(store: RecordStore, stage: AESStage) -> None:
    source = EncryptedSource(store.path, stage.key)
    dm = MedicalDataModule(source, batch_size=4, num_workers=0, augment=False, cache=True)
    dm.setup()
    (store.files / RECORDS).unlink()  # every later read would fail: the cache must serve the epoch
    assert sum(len(b["label"]) for b in dm.val_dataloader()) == 3
    uncached = MedicalDataModule(source, batch_size=4, num_workers=0, augment=False, cache=False)
    with pytest.raises(DataError, match="is incomplete"):
        uncached.setup()
