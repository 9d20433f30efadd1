"""The encrypted record store: one AES-GCM envelope per record, an authenticated manifest, and a
data source that decrypts inside DataLoader workers, in memory only.

Layout of a store directory::

    manifest.json   format, dataset id, key id (not the key), scrypt salt, per split the records'
                    offsets, lengths and SHA-256 digests, and one sealed envelope with what describes
                    the data (record ids, which can carry patient numbers, class names and counts)
    manifest.mac    HMAC-SHA256 of manifest.json under a sub-key: a changed manifest is refused
    records.bin     the envelopes, back to back

Each record's associated data binds dataset id, split, position and record id, so records cannot be
swapped, replayed into another split or store, or renamed. The SHA-256 digests let anyone check a
store's integrity without the key (``medsec encrypt action=verify``); decryption does not need them,
AES-GCM authenticates every record. A store is written into a temporary directory and renamed into
place when complete, so an interrupted run leaves nothing that loads.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from medsec import __version__
from medsec.crypto.aes import cipher_for, seal, unseal
from medsec.crypto.keys import KeyRef, SecretKey, new_kdf_params
from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.errors import ConfigError, DataError, SecurityError

FORMAT = "medsec-aes-store"
VERSION = 1
MANIFEST, MAC, RECORDS = "manifest.json", "manifest.mac", "records.bin"
ARRAY_FIELDS = ("image", "mask", "affine")


# ---- record codec ---------------------------------------------------------------------------
def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialise a record (arrays raw, the rest JSON; no pickle): 4-byte length, JSON, array bytes."""
    arrays = {k: _as_array(record[k]) for k in ARRAY_FIELDS if record.get(k) is not None}
    label = record.get("label")
    if label is not None and not isinstance(label, (int, float)):
        label = np.asarray(label).tolist()
    elif isinstance(label, (np.integer, np.floating)):
        label = label.item()
    meta = {"id": str(record["id"]), "label": label,
            "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}
    head = json.dumps(meta, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + b"".join(a.tobytes() for a in arrays.values())


def decode_record(data: bytes) -> Record:
    """Inverse of :func:`encode_record`; images with an affine come back as MONAI ``MetaTensor``."""
    (length,) = struct.unpack(">I", data[:4])
    meta = json.loads(data[4:4 + length])
    record: Record = {"id": meta["id"]}
    if meta["label"] is not None:
        label = meta["label"]
        record["label"] = np.asarray(label, dtype=np.float32) if isinstance(label, list) else label
    offset = 4 + length
    for name, dtype, shape in meta["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        record[name] = np.frombuffer(data, dt, count, offset).reshape(shape).copy()
        offset += count * dt.itemsize
    affine = record.pop("affine", None)
    if affine is not None:
        for name in ("image", "mask"):
            if name in record:
                record[name] = MetaTensor(record[name], affine=torch.as_tensor(affine))
    return record


def record_aad(dataset_id: str, split: str, index: int, record_id: str) -> bytes:
    return f"{FORMAT}/{VERSION}\0{dataset_id}\0{split}\0{index}\0{record_id}".encode()


def _manifest_mac(key: SecretKey, dataset_id: str, manifest: bytes) -> str:
    return hmac.new(key.derive(f"store-manifest/{dataset_id}", 32), manifest, hashlib.sha256).hexdigest()


def _description_cipher(key: SecretKey, dataset_id: str, bits: int) -> tuple[Any, bytes]:
    return cipher_for(key, f"store-description/{dataset_id}", bits), f"{FORMAT}/{VERSION}\0{dataset_id}".encode()


def _seal_description(key: SecretKey, dataset_id: str, bits: int, description: Mapping[str, Any]) -> str:
    cipher, aad = _description_cipher(key, dataset_id, bits)
    return base64.b64encode(seal(cipher, json.dumps(description, default=str).encode(), aad)).decode()


# ---- writing --------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_store(
    path: str | Path,
    splits: Mapping[str, Iterable[Record]],
    *,
    dataset_id: str,
    description: Mapping[str, Any],
    key_ref: KeyRef,
    bits: int = 256,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Encrypt records into a new store at ``path``, atomically.

    ``splits`` maps split name to records holding arrays (files already read); ``description``
    carries ``class_names``, ``multilabel``, ``spatial_dims``, ``train_class_counts`` and ``info``.
    ``progress`` is called with 1 per record written.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise ConfigError(f"encrypted store {path} already exists (rotate it with action=rotate, or set overwrite=true)")
    kdf = new_kdf_params() if key_ref.needs_kdf else None
    key = key_ref.load(kdf)
    cipher = cipher_for(key, f"store-records/{dataset_id}", bits)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries: dict[str, list[list[Any]]] = {}
        ids: dict[str, list[str]] = {}
        offset = 0
        with open(tmp / RECORDS, "wb") as out:
            for split in SPLITS:
                entries[split], ids[split] = [], []
                for index, record in enumerate(splits[split]):
                    record_id = str(record["id"])
                    envelope = seal(cipher, encode_record(record), record_aad(dataset_id, split, index, record_id))
                    out.write(envelope)
                    entries[split].append([offset, len(envelope), hashlib.sha256(envelope).hexdigest()])
                    ids[split].append(record_id)
                    offset += len(envelope)
                    if progress:
                        progress(1)
            out.flush()
            os.fsync(out.fileno())
        manifest = {"format": FORMAT, "version": VERSION, "dataset_id": dataset_id,
                    "algorithm": f"AES-{bits}-GCM", "bits": bits, "key_id": key.key_id, "kdf": kdf,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "medsec_version": __version__,
                    "records": entries, "sealed": _seal_description(key, dataset_id, bits, {**description, "ids": ids})}
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _fsync_write(tmp / MANIFEST, body)
        _fsync_write(tmp / MAC, _manifest_mac(key, dataset_id, body).encode() + b"\n")  # written last
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` store to ``path``; an existing store is moved aside first and
    removed only once the new one is in place."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---- reading --------------------------------------------------------------------------------
class RecordStore:
    """Read access to a store: checks the key id and the manifest's MAC on opening, decrypts one
    record at a time. Picklable (DataLoader workers); the file is opened lazily per process."""

    def __init__(self, path: str | Path, key_ref: KeyRef) -> None:
        self.path = Path(path).expanduser()
        manifest_bytes = self._read_manifest()
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{self.path / MANIFEST} is not a {FORMAT} v{VERSION} manifest")
        self.dataset_id: str = manifest["dataset_id"]
        self.manifest = manifest
        key = key_ref.load(manifest.get("kdf"))
        if key.key_id != manifest["key_id"]:
            raise SecurityError(f"store {self.path} was encrypted under key id {manifest['key_id']}, but "
                                f"{key_ref.describe()} has key id {key.key_id}: wrong key")
        mac = (self.path / MAC).read_text().strip()
        if not hmac.compare_digest(mac, _manifest_mac(key, self.dataset_id, manifest_bytes)):
            raise SecurityError(f"the manifest of store {self.path} failed authentication: it was modified")
        bits = int(manifest["bits"])
        self.cipher = cipher_for(key, f"store-records/{self.dataset_id}", bits)
        cipher, aad = _description_cipher(key, self.dataset_id, bits)
        self.description: dict[str, Any] = json.loads(
            unseal(cipher, base64.b64decode(manifest["sealed"]), aad, f"the description in store {self.path}"))
        ids = self.description.pop("ids")
        self.records: dict[str, list[list[Any]]] = {  # [id, offset, length, sha256]
            split: [[ids[split][i], *entry] for i, entry in enumerate(entries)] for split, entries in manifest["records"].items()}
        self._check_size()
        self._fd: int | None = None
        self._pid: int | None = None

    def _read_manifest(self) -> bytes:
        if not self.path.is_dir():
            raise DataError(f"encrypted store not found: {self.path} (create it with `medsec encrypt data=...`)")
        missing = [name for name in (MANIFEST, MAC, RECORDS) if not (self.path / name).is_file()]
        if missing:
            raise DataError(f"encrypted store {self.path} is incomplete (missing {', '.join(missing)})")
        return (self.path / MANIFEST).read_bytes()

    def _check_size(self) -> None:
        size = (self.path / RECORDS).stat().st_size
        for split, index, entry in self.entries():
            if entry[1] + entry[2] > size:
                raise SecurityError(f"{self.describe(split, index)} is truncated: {RECORDS} ends at byte {size}, "
                                    f"the record at {entry[1]} needs {entry[2]} bytes")

    def entries(self) -> Iterator[tuple[str, int, list[Any]]]:
        for split in SPLITS:
            for index, entry in enumerate(self.records.get(split, [])):
                yield split, index, entry

    def describe(self, split: str, index: int) -> str:
        return f"record {index} of split '{split}' (id '{self.records[split][index][0]}') in store {self.path}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _read_envelope(self, split: str, index: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path / RECORDS, os.O_RDONLY), os.getpid()
        _, offset, length, _ = self.records[split][index]
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SecurityError(f"{self.describe(split, index)} is truncated")
        return data

    def read(self, split: str, index: int) -> Record:
        """Decrypt and decode one record; a failed check raises :class:`SecurityError` naming it."""
        record_id = self.records[split][index][0]
        what = self.describe(split, index)
        plain = unseal(self.cipher, self._read_envelope(split, index),
                       record_aad(self.dataset_id, split, index, record_id), what)
        record = decode_record(plain)
        if record["id"] != record_id:
            raise SecurityError(f"{what} decrypted to record id '{record['id']}'")
        return record

    def iter_split(self, split: str) -> Iterator[Record]:
        """Decrypt the records of ``split`` in order."""
        return (self.read(split, index) for index in range(len(self.records.get(split, []))))

    def verify_digests(self) -> list[str]:
        """Check every envelope against its SHA-256 in the manifest (no key needed for this part);
        returns the descriptions of the records that differ."""
        return [self.describe(split, index) for split, index, entry in self.entries()
                if hashlib.sha256(self._read_envelope(split, index)).hexdigest() != entry[3]]


class DecryptRecordd(Transform):
    """Pipeline step that replaces ``{"record": (split, index)}`` by the decrypted record's fields.

    Runs inside DataLoader workers, or once while MONAI's ``CacheDataset`` fills its in-memory cache
    (it is a deterministic MONAI ``Transform``, so it is cached): plaintext never touches disk.
    """

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        split, index = d.pop("record")
        return d | self.store.read(split, index)


class EncryptedSource(DataSource):
    """Train and evaluate from an encrypted store: a drop-in for the source it was made from.

    Args:
        store: the store directory (written by ``medsec encrypt``).
        key: the key reference (:class:`KeyRef` fields).
        expect_dataset_id: refuse a store holding another data set (``None``: accept any).
    """

    def __init__(self, store: str | Path, key: Mapping[str, Any] | KeyRef, expect_dataset_id: str | None = None) -> None:
        self.store = Path(store).expanduser()
        self.key = KeyRef.from_config(key)
        self.expect_dataset_id = expect_dataset_id

    @property
    def dataset_id(self) -> str:
        return self.expect_dataset_id or RecordStore(self.store, self.key).dataset_id

    def load(self) -> SourceData:
        store = RecordStore(self.store, self.key)
        if self.expect_dataset_id and store.dataset_id != self.expect_dataset_id:
            raise SecurityError(f"store {self.store} holds data set '{store.dataset_id}', but the data config "
                                f"describes '{self.expect_dataset_id}'")
        m = store.description
        splits = {split: [{"record": (split, i), "id": entry[0]} for i, entry in enumerate(store.records[split])]
                  for split in SPLITS}
        return SourceData(splits=splits, class_names=list(m["class_names"]), multilabel=bool(m["multilabel"]),
                          spatial_dims=int(m["spatial_dims"]), info={**m.get("info", {}), "source": f"encrypted store {self.store}"},
                          reader=DecryptRecordd(store), train_class_counts=m.get("train_class_counts"))
