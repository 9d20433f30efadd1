"""`medsec encrypt`: make, rotate and verify encrypted record stores; create keys; open sealed files.

Actions (``action=...``):
  store    read the ``data`` source and write its encrypted store (default)
  rotate   re-encrypt a store under ``new_key``, atomically (also ``--rotate``)
  verify   check a store's manifest, digests and every record (also ``--verify``)
  keygen   write a new random 256-bit key file (mode 600) at ``crypto.key.file``
  decrypt  open a sealed file (``input``: ``predictions.csv.enc``, a sealed checkpoint) to ``output``
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from monai.data import MetaTensor
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medsec.core.app import hydra_app
from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.data.transforms import LoadImageNamed
from medsec.errors import ConfigError, SecurityError
from medsec.protections.aes import read_sealed_header
from medsec.protections.aes_stage import AESStage
from medsec.protections.keys import KeyRef, SecretKey, write_key_file
from medsec.protections.store import RECORDS, EncryptedSource, RecordStore, rotate_key, write_store
from medsec.utils.outputs import OutputWriter, atomic_write
from medsec.utils.run import save_resolved_config

log = logging.getLogger("medsec.encrypt")
ACTIONS = ("store", "rotate", "verify", "keygen", "decrypt")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True, disable=not sys.stderr.isatty())


def _readable(record: Record, reader: LoadImageNamed | None) -> Record:
    """The record with files read into arrays (and the image's affine kept when it has one)."""
    record = dict(record)
    if reader is not None:
        record = reader(record)
    image = record.get("image")
    if isinstance(image, MetaTensor):
        record["affine"] = image.affine.numpy()
    for key in ("image", "mask"):
        if key in record:
            record[key] = np.asarray(record[key])
    return record


def _description(data: SourceData) -> dict[str, Any]:
    info = json.loads(json.dumps(data.info, default=str))
    return {"class_names": data.class_names, "multilabel": data.multilabel, "spatial_dims": data.spatial_dims,
            "train_class_counts": data.class_counts(), "info": info}


def _store_size(store: RecordStore) -> int:
    return (store.files / RECORDS).stat().st_size  # the live version's records


def encrypt_source(source: DataSource, stage: AESStage, overwrite: bool = False) -> Path:
    """Read ``source`` (files decoded in memory) and write its encrypted store; returns the store path."""
    if isinstance(source, EncryptedSource):
        raise ConfigError("data: the source is already an encrypted store")
    data = source.load()
    reader = LoadImageNamed(["image", "mask"], allow_missing_keys=True) if data.from_files else None
    path = stage.store_path(source)
    with _progress() as progress:
        bar = progress.add_task(f"encrypting {source.dataset_id}", total=sum(len(data.splits[s]) for s in SPLITS))

        def records(split: str) -> Iterator[Record]:
            return (_readable(r, reader) for r in data.splits[split])

        write_store(path, {s: records(s) for s in SPLITS}, dataset_id=source.dataset_id,
                    description=_description(data), key_ref=stage.key, bits=stage.bits,
                    overwrite=overwrite, progress=lambda n: progress.advance(bar, n))
    return path


def make_store(cfg: DictConfig, stage: AESStage) -> dict[str, Any]:
    """Encrypt the ``data`` source into its store."""
    start = time.perf_counter()
    path = encrypt_source(instantiate(cfg.data).source, stage, overwrite=cfg.overwrite)
    return _summary(path, stage.key, time.perf_counter() - start)


def rotate_store(cfg: DictConfig, stage: AESStage) -> dict[str, Any]:
    """Re-encrypt the store under ``new_key`` as its next version, switched to in one atomic rename
    (:func:`medsec.protections.store.rotate_key`): a crash or error at any point leaves the store
    readable under exactly one of the two keys."""
    path = stage.store_path(instantiate(cfg.data).source)
    new_key = KeyRef.from_config(cfg.new_key, field="new_key")
    total = sum(len(v) for v in RecordStore(path, stage.key).records.values())  # the old key is checked first
    start = time.perf_counter()
    with _progress() as progress:
        bar = progress.add_task(f"re-encrypting {path.name}", total=total)
        old = rotate_key(path, stage.key, new_key, progress=lambda n: progress.advance(bar, n))
    summary = _summary(path, new_key, time.perf_counter() - start)
    log.info("store %s now under key id %s (was %s)", path, summary["key_id"], old.manifest["key_id"])
    return summary


def verify_store(cfg: DictConfig, stage: AESStage) -> dict[str, Any]:
    """Authenticate every record; raise naming each one that fails (nothing is skipped)."""
    path = stage.store_path(instantiate(cfg.data).source)
    store = RecordStore(path, stage.key)
    damaged = set(store.verify_digests())
    failures = []
    for split, index, _ in store.entries():
        what = store.describe(split, index)
        problems = ["its SHA-256 differs from the manifest"] if what in damaged else []
        try:
            store.read(split, index)
        except SecurityError:
            problems.append("it fails AES-GCM authentication")
        if problems:
            failures.append(f"{what}: {' and '.join(problems)}")
    if failures:
        shown = "\n  ".join(failures[:20])
        raise SecurityError(f"store {path}: {len(failures)} damaged record(s):\n  {shown}")
    return _summary(path, stage.key, None)


def _summary(path: Path, key_ref: KeyRef, seconds: float | None) -> dict[str, Any]:
    store = RecordStore(path, key_ref)
    counts = {s: len(store.records.get(s, [])) for s in SPLITS}
    size = _store_size(store)
    summary = {"store": str(path), "dataset_id": store.dataset_id, "key_id": store.manifest["key_id"],
               "algorithm": store.manifest["algorithm"], "records": counts, "bytes": size}
    if seconds is not None:
        summary |= {"seconds": round(seconds, 3), "records_per_s": round(sum(counts.values()) / max(seconds, 1e-9), 1)}
    log.info("store %s: %s records %s, %.1f MB, key id %s", path, store.dataset_id, counts, size / 1e6,
             summary["key_id"])
    return summary


def keygen(stage: AESStage) -> dict[str, Any]:
    if stage.key.source != "file":
        raise ConfigError("action=keygen writes a key file: set crypto.key.source=file and crypto.key.file=PATH")
    key = SecretKey.generate()
    path = write_key_file(stage.key.file, key)
    log.info("new key id %s written to %s (mode 600): keep a backup, without it the data cannot be read", key.key_id, path)
    return {"key_file": str(path), "key_id": key.key_id}


def decrypt_file(cfg: DictConfig, stage: AESStage) -> dict[str, Any]:
    if not cfg.get("input"):
        raise ConfigError("input: name the sealed file to decrypt (input=PATH)")
    source = Path(cfg.input).expanduser()
    if not source.is_file():
        raise ConfigError(f"input: file not found: {source}")
    header, _, _ = read_sealed_header(source.read_bytes(), f"sealed file {source}")
    plain = stage.open(source, header["purpose"])
    target = cfg.get("output") or str(source.with_suffix("") if source.suffix == ".enc" else source) + ".plain"
    if target == "-":
        sys.stdout.buffer.write(plain)
        sys.stdout.flush()
    else:
        atomic_write(Path(target).expanduser(), bytes(plain), mode=0o600)  # a new file: never through a symlink
        log.info("decrypted %s to %s", source, target)
    return {"input": str(source), "output": target, "bytes": len(plain), "key_id": header["key_id"]}


def encrypt(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.action``; returns the summary written to ``encrypt_report.json``."""
    if cfg.action not in ACTIONS:
        raise ConfigError(f"action must be one of {list(ACTIONS)}, got '{cfg.action}'")
    if not cfg.get("crypto"):
        raise ConfigError("crypto: `medsec encrypt` needs a security stage (crypto=aes)")
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    stage: AESStage = instantiate(cfg.crypto)
    if cfg.action == "keygen":
        summary = keygen(stage)
    elif cfg.action == "decrypt":
        summary = decrypt_file(cfg, stage)
    else:
        summary = {"store": make_store, "rotate": rotate_store, "verify": verify_store}[cfg.action](cfg, stage)
    OutputWriter(out_dir).write_json("encrypt_report.json", {"action": cfg.action, **summary})
    return summary


main = hydra_app("encrypt", encrypt)

if __name__ == "__main__":
    main()
