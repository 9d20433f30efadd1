"""Where verbs write per-case results (predictions, overlays): plainly, or sealed by a security stage."""
from __future__ import annotations

import os
from pathlib import Path


class OutputWriter:
    """Writes per-case result files under a run directory, each atomically (temporary file, then
    rename), so an interrupted run never leaves a half-written file under the final name.

    Security stages subclass it to encrypt what is written (``crypto.encrypt_outputs``).
    """

    suffix = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def encode(self, data: bytes, name: str) -> bytes:
        """The bytes stored for ``data`` (identity here; encryption in sealed writers)."""
        return data

    def write(self, name: str, data: bytes) -> Path:
        """Store ``data`` as ``root/name`` (plus :attr:`suffix`); returns the path written."""
        path = self.root / (name + self.suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.encode(data, name))
        tmp.replace(path)
        return path
