"""`crypto=aes`: the AES-GCM security stage as one configured object that the verbs consult.

It wraps a data source into the encrypted store made from it, seals checkpoints (through
:class:`medsec.core.checkpoint.CheckpointIO`) and per-run outputs (an :class:`OutputWriter`), and
opens them again. Sealed files are bound to their path within their run directory and to the
run's id (``run.json``), so they open only where they were written.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsec.core.contracts import Protection
from medsec.data.sources.base import DataSource
from medsec.errors import ConfigError
from medsec.protections.aes import open_sealed_bytes, seal_file_bytes
from medsec.protections.keys import KeyRef
from medsec.protections.store import EncryptedSource
from medsec.utils.outputs import OutputWriter, atomic_write, ensure_run_id, find_run


class AESStage(Protection):
    """The configured AES stage.

    Args:
        key: key reference (``source`` file/env/passphrase and its field); never the key.
        store_root: stores live in ``store_root/<dataset id>`` unless ``store`` names one.
        store: an explicit store directory.
        bits: 256 (default) or 128.
        encrypt_checkpoints: seal checkpoints (``*.ckpt`` become sealed files).
        encrypt_outputs: seal per-case outputs (``predictions.csv.enc``, overlays, ...).
    """

    name = "aes"
    order = 10
    confidential = True

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

    @property
    def seals(self) -> bool:
        return True

    def wrap_source(self, source: DataSource) -> EncryptedSource:
        """The encrypted store made from ``source`` (which itself is never read)."""
        if isinstance(source, EncryptedSource):
            return source
        return EncryptedSource(self.store_path(source), self.key, expect_dataset_id=source.dataset_id)

    def output_writer(self, root: str | Path) -> OutputWriter:
        """The writer for the run in ``root``: sealing when ``encrypt_outputs`` is set."""
        if not self.encrypt_outputs:
            return OutputWriter(root)
        ensure_run_id(root)
        return SealedOutputWriter(root, self)

    def seal(self, data: bytes, path: str | Path, purpose: str) -> bytes:
        """``data`` sealed for ``purpose``, bound to ``path``'s place in its run (``run.json``
        must exist above it: :func:`ensure_run_id`)."""
        name, run_id = find_run(path)
        return seal_file_bytes(data, self.key, purpose, self.bits, name=name, run_id=run_id)

    def seal_to(self, path: str | Path, data: bytes, purpose: str) -> Path:
        """Write ``data`` sealed to ``path``, atomically."""
        path = Path(path)
        return atomic_write(path, self.seal(data, path, purpose))

    def open(self, path: str | Path, purpose: str) -> bytes | bytearray:
        """Open the sealed file ``path``; it must sit where it was written, in the run it was written for."""
        name, run_id = find_run(path)
        return open_sealed_bytes(Path(path).read_bytes(), self.key, purpose, f"sealed file {path}", name=name,
                                 run_id=run_id)


class SealedOutputWriter(OutputWriter):
    """Writes each output as a sealed file ``<name>.enc``."""

    suffix = ".enc"
    sealed = True

    def __init__(self, root: str | Path, stage: AESStage) -> None:
        super().__init__(root)
        self.stage = stage

    def encode(self, data: bytes, path: Path) -> bytes:
        return self.stage.seal(data, path, "output")
