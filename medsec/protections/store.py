"""The encrypted record store: one AES-GCM envelope per record, an authenticated manifest, and a
data source that decrypts inside DataLoader workers, in memory only.

Layout of a store directory ``S``::

    CURRENT           the name of the live version (``v2``): one line, only ever replaced whole
                      (written to a temporary file, synced, renamed over the old one)
    v2/manifest.json  format, dataset id, key id (not the key), scrypt salt, per split the records'
                      offsets, lengths and SHA-256 digests, and one sealed envelope with what
                      describes the data (record ids, which can carry patient numbers, class names
                      and counts)
    v2/manifest.mac   HMAC-SHA256 of manifest.json under a sub-key: a changed manifest is refused
    v2/records.bin    the envelopes, back to back

Each record's associated data binds dataset id, split, position and record id, so records cannot be
swapped, replayed into another split or store, or renamed. The SHA-256 digests let anyone check a
store's integrity without the key (``medsec encrypt action=verify``); decryption does not need them,
AES-GCM authenticates every record.

Crash safety. A new store is built whole (``CURRENT`` and ``v1/``) in a temporary sibling directory,
synced, and renamed into place: an interrupted run leaves nothing that loads. Rotating the key (or
overwriting) takes an exclusive lock on ``S``, writes ``v<n+1>`` inside ``S`` (as a temporary
directory, synced, then renamed), syncs ``S``, switches ``CURRENT`` (one atomic rename), syncs ``S``
again and only then removes ``v<n>``. A crash or an error at any step leaves ``S`` readable under
exactly one of the two keys: the old one before the switch, the new one after it. Opening a store
removes what an interrupted write left behind (``.tmp-*`` entries, versions ``CURRENT`` does not
name) when it can take the lock without waiting, and touches nothing while a rotation holds it.
Stores written before versions existed (the three files directly in ``S``, no ``CURRENT``) are read
as they are; their first rotation moves them to this layout the same way. Every filesystem step of
writing, rotating and recovering calls :func:`step_hook` with its name first (tests inject faults
there).

Everything read from disk is untrusted until authenticated, and checked before use: the manifest's
fields (types, ranges, the scrypt parameters before any key is derived), the record entries against
the size of ``records.bin``, and each decrypted record's header against its byte count (object
dtypes are refused; no allocation is sized by an unchecked number). Every problem is a
:mod:`medsec.errors` error naming the store, field or record.
"""
from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from medsec import __version__
from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.errors import ConfigError, DataError, MedsecError, SecurityError
from medsec.protections.aes import NONCE_BYTES, TAG_BYTES, cipher_for, seal, unseal
from medsec.protections.keys import KeyRef, SecretKey, new_kdf_params

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("medsec.protections.store")

FORMAT = "medsec-aes-store"
VERSION = 1
MANIFEST, MAC, RECORDS = "manifest.json", "manifest.mac", "records.bin"
STORE_FILES = (MANIFEST, MAC, RECORDS)
CURRENT = "CURRENT"
TEMP_PREFIX = ".tmp-"
"""Everything temporary inside a store directory starts with this; opening a store removes it."""
ARRAY_FIELDS = ("image", "mask", "affine")
MAX_MANIFEST_BYTES = 256 << 20
MAX_MAC_BYTES = 256
MAX_DIMS = 8
LOCK_WAIT_S = 10.0
"""How long a writer waits for the store's lock (readers hold it only while cleaning up)."""

CREATE_STEPS = ("create-temp-dir", "write-records", "write-manifest", "write-mac", "sync-version",
                "write-current", "sync-temp-dir", "rename-store", "sync-parent")
"""The steps of writing a new store, in order (each announced to :func:`step_hook`)."""
ROTATE_STEPS = ("create-temp-version", "write-records", "write-manifest", "write-mac", "sync-version",
                "rename-version", "sync-store", "write-current-temp", "switch-current", "sync-store-switched",
                "retire-old", "remove-old", "sync-store-cleaned")
"""The steps of adding a version to a versioned store (rotation, overwrite); the switch is ``switch-current``."""
MIGRATE_STEPS = (*ROTATE_STEPS[:ROTATE_STEPS.index("retire-old")],
                 *(f"remove-old-{name}" for name in STORE_FILES), "sync-store-cleaned")
"""The same for a store in the flat layout of before versions (its old files are removed one by one)."""

_VERSION_NAME = re.compile(r"v([1-9][0-9]{0,8})")
_DTYPE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SALT = re.compile(r"(?:[0-9a-f]{2}){16,64}")


def step_hook(step: str) -> None:
    """Called with the name of each filesystem step of writing, rotating or cleaning up a store,
    just before it runs. Does nothing; tests replace it to raise or to kill the process there."""


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


# ---- record codec ---------------------------------------------------------------------------
def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialise a record (arrays raw, the rest JSON; no pickle): 4-byte length, JSON, array bytes."""
    arrays = {k: _as_array(record[k]) for k in ARRAY_FIELDS if record.get(k) is not None}
    for name, array in arrays.items():
        if array.dtype.hasobject or array.dtype.kind not in "biufc":
            raise DataError(f"record '{record['id']}': {name} has dtype {array.dtype}, not a numeric one")
    label = record.get("label")
    if label is not None and not isinstance(label, (int, float)):
        label = np.asarray(label).tolist()
    elif isinstance(label, (np.integer, np.floating)):
        label = label.item()
    meta = {"id": str(record["id"]), "label": label,
            "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}
    head = json.dumps(meta, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + b"".join(a.tobytes() for a in arrays.values())


def decode_record(data: bytes | bytearray, what: str = "a record") -> Record:
    """Inverse of :func:`encode_record`; images with an affine come back as MONAI ``MetaTensor``.

    Everything in the header is checked before use (``what`` names the record in errors): only
    plain numeric dtypes, shapes whose byte count fits the bytes that are there (so nothing is
    allocated from an unchecked size), and no bytes left over. A malformed record raises
    :class:`DataError`.
    """
    def bad(problem: str) -> DataError:
        return DataError(f"{what} is malformed: {problem}")

    if len(data) < 4:
        raise bad(f"{len(data)} bytes, shorter than its 4-byte header length")
    (length,) = struct.unpack_from(">I", data, 0)
    if length > len(data) - 4:
        raise bad(f"its header claims {length} bytes, but only {len(data) - 4} follow")
    try:
        meta = json.loads(bytes(data[4:4 + length]))
    except (ValueError, RecursionError):
        raise bad("its header is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str) or not isinstance(meta.get("arrays"), list):
        raise bad("its header lacks a string 'id' or an 'arrays' list")
    record: Record = {"id": meta["id"]}
    label = meta.get("label")
    if label is not None:
        if isinstance(label, list):
            try:
                record["label"] = np.asarray(label, dtype=np.float32)
            except (ValueError, TypeError, OverflowError):
                raise bad("its label is not a (rectangular) list of numbers") from None
        elif isinstance(label, (bool, int, float)):
            record["label"] = label
        else:
            raise bad(f"its label is a {type(label).__name__}, not a number or a list")
    offset = 4 + length
    for item in meta["arrays"]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise bad("an 'arrays' entry is not [name, dtype, shape]")
        name, dtype, shape = item
        if name not in ARRAY_FIELDS or name in record:
            raise bad(f"unknown or repeated array '{name[:40]}'")
        if not isinstance(dtype, str) or not _DTYPE.fullmatch(dtype):
            raise bad(f"array '{name}' has dtype {str(dtype)[:40]!r}, not a plain numeric dtype")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise bad(f"array '{name}' has an unknown dtype {dtype!r}") from None
        if dt.hasobject or dt.kind not in "biufc" or dt.itemsize == 0:
            raise bad(f"array '{name}' has dtype {dtype!r}, not a plain numeric dtype")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(n) and n >= 0 for n in shape)):
            raise bad(f"array '{name}' has shape {str(shape)[:60]}, not a list of at most {MAX_DIMS} sizes")
        count = math.prod(shape)  # exact (Python integers): no overflow
        left = len(data) - offset
        if count * dt.itemsize > left:
            raise bad(f"array '{name}' of shape {shape} and dtype {dtype} needs {count * dt.itemsize} bytes, "
                      f"{left} are left")
        array = np.frombuffer(data, dt, count, offset).reshape(shape)
        record[name] = array.astype(dt.newbyteorder("="), copy=True)  # native byte order (torch needs it)
        offset += count * dt.itemsize
    if offset != len(data):
        raise bad(f"{len(data) - offset} bytes follow its last array")
    affine = record.pop("affine", None)
    if affine is not None:
        if affine.ndim != 2 or affine.shape[0] != affine.shape[1] or not 2 <= affine.shape[0] <= 5 \
                or affine.dtype.kind not in "iuf":
            raise bad(f"its affine has shape {affine.shape} and dtype {affine.dtype}, not a square real matrix")
        for name in ("image", "mask"):
            if name in record:
                try:
                    record[name] = MetaTensor(record[name], affine=torch.as_tensor(affine))
                except (TypeError, ValueError, RuntimeError) as err:
                    raise bad(f"its {name} cannot carry the affine ({str(err)[:80]})") from None
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


# ---- the directory: versions, CURRENT, lock, clean-up ---------------------------------------
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _read_current(path: Path) -> str | None:
    """The live version named by ``CURRENT`` (``None``: a store of the flat layout, or no store)."""
    try:
        with open(path / CURRENT, "rb") as handle:
            raw = handle.read(33)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DataError(f"store {path}: cannot read {CURRENT} ({err.strerror})") from None
    name = raw.strip().decode("ascii", errors="replace")
    if len(raw) > 32 or not _VERSION_NAME.fullmatch(name):
        raise DataError(f"store {path}: {CURRENT} is damaged (it must name the live version, such as v1)")
    return name


def live_dir(path: str | Path) -> Path:
    """The directory holding the live ``manifest.json``, ``manifest.mac`` and ``records.bin`` of the
    store at ``path``: the version ``CURRENT`` names, or ``path`` itself for a flat (pre-version) store."""
    path = Path(path).expanduser()
    current = _read_current(path)
    return path / current if current else path


def _versions(names: Iterable[str]) -> list[int]:
    return [int(m.group(1)) for m in map(_VERSION_NAME.fullmatch, names) if m]


@contextmanager
def _lock(path: Path, wait: float) -> Iterator[bool]:
    """An exclusive ``flock`` on the store directory, held until the block ends; yields whether it
    was taken within ``wait`` seconds."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    with _lock(path, LOCK_WAIT_S) as taken:
        if not taken:
            raise ConfigError(f"store {path} is locked: another process is writing or rotating it; "
                              "try again when it has finished")
        yield


def _leftovers(path: Path) -> list[Path]:
    """What an interrupted write or rotation left inside the store: ``.tmp-*`` entries always;
    versions other than the live one, and the flat files of a migrated store, only when the live
    version is whole (a damaged store is left as it is, for a person to look at)."""
    try:
        names = sorted(os.listdir(path))
        current = _read_current(path)
    except (OSError, DataError):
        return []
    found = [path / n for n in names if n.startswith(TEMP_PREFIX)]
    live = path / current if current else path
    if all((live / n).is_file() for n in STORE_FILES):
        found += [path / n for n in names if _VERSION_NAME.fullmatch(n) and n != current]
        if current:
            found += [path / n for n in names if n in STORE_FILES]
    return found


def _clean_locked(path: Path) -> None:
    """Remove the leftovers; the caller holds the lock."""
    leftovers = _leftovers(path)
    for entry in leftovers:
        step_hook("recover-remove")
        _remove(entry)
    if leftovers:
        step_hook("recover-sync")
        _fsync_dir(path)
        log.info("store %s: removed what an interrupted write left: %s", path, ", ".join(p.name for p in leftovers))


def recover(path: str | Path) -> None:
    """Clean up after an interrupted write or rotation if the store's lock is free right now (a
    rotation in progress holds it: then nothing is touched). Called by :class:`RecordStore`."""
    path = Path(path).expanduser()
    if not _leftovers(path):
        return
    with _lock(path, 0) as taken:
        if taken:
            try:
                _clean_locked(path)
            except OSError as err:  # a read-only copy, say: reading it does not need the clean-up
                log.warning("store %s: could not remove leftovers of an interrupted write (%s)", path, err)


# ---- writing --------------------------------------------------------------------------------
def _load_new_key(key_ref: KeyRef) -> tuple[SecretKey, dict[str, Any] | None]:
    kdf = new_kdf_params() if key_ref.needs_kdf else None
    return key_ref.load(kdf), kdf


def _write_version(
    directory: Path,
    splits: Mapping[str, Iterable[Record]],
    *,
    dataset_id: str,
    description: Mapping[str, Any],
    key: SecretKey,
    kdf: dict[str, Any] | None,
    bits: int,
    progress: Callable[[int], None] | None,
) -> None:
    """Write and sync ``records.bin``, ``manifest.json`` and (last) ``manifest.mac`` into ``directory``."""
    cipher = cipher_for(key, f"store-records/{dataset_id}", bits)
    entries: dict[str, list[list[Any]]] = {}
    ids: dict[str, list[str]] = {}
    offset = 0
    step_hook("write-records")
    with open(directory / RECORDS, "wb") as out:
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
    step_hook("write-manifest")
    _fsync_write(directory / MANIFEST, body)
    step_hook("write-mac")
    _fsync_write(directory / MAC, _manifest_mac(key, dataset_id, body).encode() + b"\n")  # written last
    step_hook("sync-version")
    _fsync_dir(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _create(path: Path, write: Callable[[Path], None]) -> None:
    """Build a new store in a temporary sibling directory and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.iterdir():  # left by a writer that was killed (its process is gone)
        suffix = stale.name[len(prefix):] if stale.name.startswith(prefix) else ""
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            step_hook("recover-remove")
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        step_hook("create-temp-dir")
        (tmp / "v1").mkdir(parents=True)
        write(tmp / "v1")
        step_hook("write-current")
        _fsync_write(tmp / CURRENT, b"v1\n")
        step_hook("sync-temp-dir")
        _fsync_dir(tmp)
        step_hook("rename-store")
        try:
            os.rename(tmp, path)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise ConfigError(f"encrypted store {path} already exists (it appeared while this one was "
                                  "being written)") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step_hook("sync-parent")
    _fsync_dir(path.parent)


def _switch_current(path: Path, name: str) -> None:
    tmp = path / f"{TEMP_PREFIX}{CURRENT}-{os.getpid()}"
    step_hook("write-current-temp")
    _fsync_write(tmp, f"{name}\n".encode())
    step_hook("switch-current")
    os.replace(tmp, path / CURRENT)


def _add_version(path: Path, write: Callable[[Path], None]) -> str:
    """Write the next version inside the store and switch ``CURRENT`` to it; the caller holds the
    lock. Before the switch a failure removes the new version (the old one is live and untouched);
    after it the old version is removed, or left to the next opening if that fails."""
    old = _read_current(path)
    name = f"v{1 + max(_versions(os.listdir(path)), default=0)}"
    tmp = path / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    try:
        step_hook("create-temp-version")
        tmp.mkdir()
        write(tmp)
        step_hook("rename-version")
        os.rename(tmp, path / name)
        step_hook("sync-store")
        _fsync_dir(path)
        _switch_current(path, name)
        step_hook("sync-store-switched")
        _fsync_dir(path)
        if old is None:  # the flat layout: its three files
            for file in STORE_FILES:
                step_hook(f"remove-old-{file}")
                (path / file).unlink(missing_ok=True)
        elif (path / old).is_dir():
            retired = path / f"{TEMP_PREFIX}old-{old}-{os.getpid()}"
            step_hook("retire-old")
            os.rename(path / old, retired)
            step_hook("remove-old")
            shutil.rmtree(retired)
        step_hook("sync-store-cleaned")
        _fsync_dir(path)
    except BaseException as err:
        try:
            switched = _read_current(path) == name
            _clean_locked(path)  # removes the new version if it is not live, else the old one
        except Exception:  # noqa: BLE001 - the next opening cleans up; report the first error
            switched = False
        if switched and isinstance(err, OSError):
            log.warning("store %s: now at %s, but cleaning up the old version failed (%s); it is removed "
                        "when the store is next opened", path, name, err)
            return name
        raise
    return name


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
    ``progress`` is called with 1 per record written. With ``overwrite``, an existing store gets the
    records as its next version (the old one stays live until the switch).
    """
    path = Path(path).expanduser()
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        raise ConfigError(f"encrypted store {path} already exists (rotate it with action=rotate, or set overwrite=true)")
    if exists and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a store directory; refusing to replace it")
    key, kdf = _load_new_key(key_ref)

    def write(directory: Path) -> None:
        _write_version(directory, splits, dataset_id=dataset_id, description=description, key=key, kdf=kdf,
                       bits=bits, progress=progress)

    if exists:
        with _writer_lock(path):
            _clean_locked(path)
            _add_version(path, write)
    else:
        _create(path, write)
    return path


def rotate_key(
    path: str | Path,
    key_ref: KeyRef,
    new_key_ref: KeyRef,
    *,
    progress: Callable[[int], None] | None = None,
) -> RecordStore:
    """Re-encrypt the store at ``path`` under ``new_key_ref`` as its next version, switched to in one
    atomic rename (see the module docstring); returns the old store (for its manifest)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"encrypted store not found: {path} (create it with `medsec encrypt data=...`)")
    with _writer_lock(path):
        _clean_locked(path)
        old = RecordStore(path, key_ref)
        key, kdf = _load_new_key(new_key_ref)

        def write(directory: Path) -> None:
            _write_version(directory, {split: old.iter_split(split) for split in SPLITS}, dataset_id=old.dataset_id,
                           description=old.description, key=key, kdf=kdf, bits=old.bits, progress=progress)

        try:
            _add_version(path, write)
        finally:
            old.close()
    return old


# ---- reading --------------------------------------------------------------------------------
def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path} is larger than {limit} bytes: not a store file")
    return data


class RecordStore:
    """Read access to a store: checks the key id and the manifest's MAC on opening, decrypts one
    record at a time. Picklable (DataLoader workers); the file is opened lazily per process.

    ``path`` is the store directory, ``files`` the directory of its live version (``path`` itself
    for a flat store).
    """

    def __init__(self, path: str | Path, key_ref: KeyRef) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DataError(f"encrypted store not found: {self.path} (create it with `medsec encrypt data=...`)")
        recover(self.path)
        self.files, manifest_bytes, mac, size = self._read_live()
        manifest = self._parse_manifest(manifest_bytes)
        self.dataset_id: str = manifest["dataset_id"]
        self.bits: int = manifest["bits"]
        key = self._load_key(key_ref, manifest)
        if key.key_id != manifest["key_id"]:
            raise SecurityError(f"store {self.path} was encrypted under key id {manifest['key_id']}, but "
                                f"{key_ref.describe()} has key id {key.key_id}: wrong key")
        expected = _manifest_mac(key, self.dataset_id, manifest_bytes).encode()
        if not hmac.compare_digest(mac.strip(), expected):
            raise SecurityError(f"the manifest of store {self.path} failed authentication: it was modified")
        # authenticated from here on: still checked, a key holder's bug must not become a crash
        self.manifest = manifest
        entries = self._check_entries(manifest)
        self.cipher = cipher_for(key, f"store-records/{self.dataset_id}", self.bits)
        self.description: dict[str, Any] = self._open_description(key, manifest["sealed"], entries)
        ids = self.description.pop("ids")
        self.records: dict[str, list[list[Any]]] = {  # [id, offset, length, sha256]
            split: [[ids[split][i], *entry] for i, entry in enumerate(entries[split])] for split in SPLITS}
        self._check_size(size)
        self._fd: int | None = None
        self._pid: int | None = None

    def _read_live(self) -> tuple[Path, bytes, bytes, int]:
        """The live version's directory, manifest, MAC and records size (read again if a rotation
        switched versions meanwhile)."""
        for _ in range(3):
            files = live_dir(self.path)
            missing = [name for name in STORE_FILES if not (files / name).is_file()]
            if not missing:
                try:
                    return (files, _read_bounded(files / MANIFEST, MAX_MANIFEST_BYTES),
                            _read_bounded(files / MAC, MAX_MAC_BYTES), (files / RECORDS).stat().st_size)
                except FileNotFoundError:
                    pass
            if live_dir(self.path) == files:
                break
        where = "" if files == self.path else f"{files.name}/"
        missing = [f"{where}{name}" for name in STORE_FILES if not (files / name).is_file()]
        raise DataError(f"encrypted store {self.path} is incomplete (missing {', '.join(missing) or 'files'})")

    def _bad_field(self, field: str, problem: str) -> DataError:
        return DataError(f"store {self.path}: {MANIFEST} field '{field}' {problem} (the manifest is damaged "
                         "or was tampered with)")

    def _parse_manifest(self, data: bytes) -> dict[str, Any]:
        """The fields needed before the MAC check, type-checked (no key is derived before this)."""
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError):
            raise DataError(f"store {self.path}: {MANIFEST} is not valid JSON (it is damaged or was "
                            "tampered with)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{self.files / MANIFEST} is not a {FORMAT} v{VERSION} manifest")
        if not isinstance(manifest.get("dataset_id"), str) or not manifest["dataset_id"]:
            raise self._bad_field("dataset_id", "is not a non-empty string")
        if not isinstance(manifest.get("key_id"), str) or not re.fullmatch(r"[0-9a-f]{16}", manifest["key_id"]):
            raise self._bad_field("key_id", "is not a 16-digit hex key id")
        if not _is_int(manifest.get("bits")) or manifest["bits"] not in (128, 256):
            raise self._bad_field("bits", "is not 128 or 256")
        self._check_kdf(manifest.get("kdf", "missing"))
        return manifest

    def _check_kdf(self, kdf: Any) -> None:
        if kdf is None:
            return
        if not isinstance(kdf, dict):
            raise self._bad_field("kdf", "is neither null nor an object of scrypt parameters")
        if set(kdf) != {"name", "salt", "n", "r", "p"}:
            raise self._bad_field("kdf", "must hold exactly name, salt, n, r and p")
        if kdf["name"] != "scrypt":
            raise self._bad_field("kdf", "names another function than scrypt")
        if not isinstance(kdf["salt"], str) or not _SALT.fullmatch(kdf["salt"]):
            raise self._bad_field("kdf", "has a salt that is not 16 to 64 bytes of lower-case hex")
        for name in ("n", "r", "p"):
            if not _is_int(kdf[name]) or kdf[name] < 1:
                raise self._bad_field("kdf", f"has {name} that is not a positive integer")
        if kdf["n"] < 2 or kdf["n"] & (kdf["n"] - 1):
            raise self._bad_field("kdf", "has n that is not a power of 2 above 1")

    def _load_key(self, key_ref: KeyRef, manifest: dict[str, Any]) -> SecretKey:
        kdf = manifest["kdf"]
        if not key_ref.needs_kdf:
            return key_ref.load()
        if kdf is None:
            raise self._bad_field("kdf", f"is null, but {key_ref.describe()} needs the scrypt parameters the store "
                                         "was written with")
        where = f"store {self.path} (the scrypt parameters in its {MANIFEST} field 'kdf')"
        try:
            return key_ref.load(kdf)
        except MedsecError as err:  # a bound in keys.py, an unset variable: say which store and field
            try:
                wrapped = type(err)(f"{where}: {err}")
            except TypeError:
                wrapped = DataError(f"{where}: {err}")
            raise wrapped from None
        except MemoryError:
            raise DataError(f"{where}: deriving the key needs more memory than there is (n={kdf['n']}, r={kdf['r']}, "
                            f"p={kdf['p']}); the manifest is damaged or was tampered with") from None
        except (ValueError, TypeError, OverflowError) as err:
            raise DataError(f"{where}: deriving the key failed ({err}); the manifest is damaged or was "
                            "tampered with") from None

    def _check_entries(self, manifest: dict[str, Any]) -> dict[str, list[list[Any]]]:
        if not isinstance(manifest.get("algorithm"), str):
            raise self._bad_field("algorithm", "is not a string")
        records = manifest.get("records")
        if not isinstance(records, dict) or set(records) != set(SPLITS):
            raise self._bad_field("records", f"is not an object with the splits {list(SPLITS)}")
        for split in SPLITS:
            if not isinstance(records[split], list):
                raise self._bad_field("records", f"has a split '{split}' that is not a list")
            for index, entry in enumerate(records[split]):
                if not (isinstance(entry, list) and len(entry) == 3 and _is_int(entry[0]) and entry[0] >= 0
                        and _is_int(entry[1]) and entry[1] >= NONCE_BYTES + TAG_BYTES
                        and isinstance(entry[2], str) and _SHA256.fullmatch(entry[2])):
                    raise self._bad_field("records", f"has entry {index} of split '{split}' that is not "
                                                     "[offset, length, sha256]")
        if not isinstance(manifest.get("sealed"), str):
            raise self._bad_field("sealed", "is not a string")
        return records

    def _open_description(self, key: SecretKey, sealed: str, entries: dict[str, list[Any]]) -> dict[str, Any]:
        cipher, aad = _description_cipher(key, self.dataset_id, self.bits)
        try:
            envelope = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise self._bad_field("sealed", "is not base64") from None
        plain = unseal(cipher, envelope, aad, f"the description in store {self.path}")
        try:
            description = json.loads(plain)
        except (ValueError, RecursionError):
            description = None
        ids = description.get("ids") if isinstance(description, dict) else None
        if not (isinstance(ids, dict) and all(isinstance(ids.get(s), list) and len(ids[s]) == len(entries[s])
                                              and all(isinstance(i, str) for i in ids[s]) for s in SPLITS)):
            raise DataError(f"the description in store {self.path} is malformed (its record ids do not match "
                            "the manifest)")
        return description

    def _check_size(self, size: int) -> None:
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

    def close(self) -> None:
        """Close this process's handle on ``records.bin`` (reading opens it again)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def _read_envelope(self, split: str, index: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd, self._pid = os.open(self.files / RECORDS, os.O_RDONLY), os.getpid()
            except FileNotFoundError:
                raise DataError(f"store {self.path} changed while it was open ({self.files / RECORDS} is gone: "
                                "rotated?); open it again") from None
        _, offset, length, _ = self.records[split][index]
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SecurityError(f"{self.describe(split, index)} is truncated")
        return data

    def read(self, split: str, index: int) -> Record:
        """Decrypt and decode one record; a failed check raises :class:`SecurityError` (a record that
        authenticates but does not decode, :class:`DataError`) naming it."""
        record_id = self.records[split][index][0]
        what = self.describe(split, index)
        plain = unseal(self.cipher, self._read_envelope(split, index),
                       record_aad(self.dataset_id, split, index, record_id), what)
        record = decode_record(plain, what)
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
        try:
            class_names, multilabel = list(m["class_names"]), bool(m["multilabel"])
            spatial_dims, info = int(m["spatial_dims"]), dict(m.get("info") or {})
        except (KeyError, TypeError, ValueError):
            raise DataError(f"the description in store {self.store} lacks class_names, multilabel or spatial_dims "
                            "(was it written by `medsec encrypt`?)") from None
        return SourceData(splits=splits, class_names=class_names, multilabel=multilabel,
                          spatial_dims=spatial_dims, info={**info, "source": f"encrypted store {self.store}"},
                          reader=DecryptRecordd(store), train_class_counts=m.get("train_class_counts"))
