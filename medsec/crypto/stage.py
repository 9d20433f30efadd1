"""`crypto=aes`: the AES-GCM security stage as one configured object that the verbs consult.

It wraps a data source into the encrypted store made from it, seals checkpoints (a Lightning
``CheckpointIO``) and per-case outputs (an :class:`OutputWriter`), and opens them again.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medsec.crypto.aes import is_sealed, open_sealed_bytes, seal_file_bytes
from medsec.crypto.keys import KeyRef
from medsec.crypto.store import EncryptedSource
from medsec.data.sources.base import DataSource
from medsec.errors import ConfigError
from medsec.utils.outputs import OutputWriter


class AESStage:
    """The configured AES stage.

    Args:
        key: key reference (``source`` file/env/passphrase and its field); never the key.
        store_root: stores live in ``store_root/<dataset id>`` unless ``store`` names one.
        store: an explicit store directory.
        bits: 256 (default) or 128.
        encrypt_checkpoints: seal checkpoints (``*.ckpt`` become sealed files).
        encrypt_outputs: seal per-case outputs (``predictions.csv.enc``, overlays, ...).
    """

    def __init__(self, key: Mapping[str, Any] | KeyRef, store_root: str | Path = "data/encrypted",
                 store: str | Path | None = None, bits: int = 256, encrypt_checkpoints: bool = False,
                 encrypt_outputs: bool = False) -> None:
        self.key = KeyRef.from_config(key)
        self.store_root = Path(store_root).expanduser()
        self.store = Path(store).expanduser() if store else None
        if bits not in (128, 256):
            raise ConfigError(f"crypto.bits must be 128 or 256, got {bits}")
        self.bits = bits
        self.encrypt_checkpoints = encrypt_checkpoints
        self.encrypt_outputs = encrypt_outputs

    def store_path(self, source: DataSource) -> Path:
        """Where the encrypted store of ``source`` lives."""
        return self.store or self.store_root / source.dataset_id

    def wrap(self, source: DataSource) -> EncryptedSource:
        """The encrypted store made from ``source`` (which itself is never read)."""
        if isinstance(source, EncryptedSource):
            return source
        return EncryptedSource(self.store_path(source), self.key, expect_dataset_id=source.dataset_id)

    def checkpoint_io(self) -> SealedCheckpointIO | None:
        return SealedCheckpointIO(self) if self.encrypt_checkpoints else None

    def output_writer(self, root: str | Path) -> OutputWriter:
        return SealedOutputWriter(root, self) if self.encrypt_outputs else OutputWriter(root)

    def seal(self, data: bytes, purpose: str) -> bytes:
        return seal_file_bytes(data, self.key, purpose, self.bits)

    def open(self, path: str | Path, purpose: str) -> bytes:
        return open_sealed_bytes(Path(path).read_bytes(), self.key, purpose, f"sealed file {path}")


class SealedOutputWriter(OutputWriter):
    """Writes each output as a sealed file ``<name>.enc``."""

    suffix = ".enc"

    def __init__(self, root: str | Path, stage: AESStage) -> None:
        super().__init__(root)
        self.stage = stage

    def encode(self, data: bytes, name: str) -> bytes:
        return self.stage.seal(data, "output")


class SealedCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that seals every checkpoint with AES-GCM (atomic writes)."""

    def __init__(self, stage: AESStage) -> None:
        self.stage = stage

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.stage.seal(buffer.getvalue(), "checkpoint"))
        tmp.replace(path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, self.stage, map_location)


def checkpoint_file(path: str | Path, stage: AESStage | None) -> Path | io.BytesIO:
    """``path`` itself for a plain checkpoint; the decrypted bytes, in memory, for a sealed one
    (which needs ``crypto=aes`` with its key)."""
    path = Path(path)
    if not is_sealed(path):
        return path
    if stage is None:
        raise ConfigError(f"ckpt_path: {path} is encrypted; add crypto=aes with the key it was sealed with")
    return io.BytesIO(stage.open(path, "checkpoint"))


def load_checkpoint(path: str | Path, stage: AESStage | None, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a plain or sealed checkpoint (see :func:`checkpoint_file`)."""
    return torch.load(checkpoint_file(path, stage), map_location=map_location, weights_only=False)
