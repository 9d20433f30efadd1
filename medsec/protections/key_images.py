"""Stored key images (DeepKeyGen): sealed with AES-GCM together with the digest of the generator
that made them. A key image is fixed by the generator's weights and the secret seed, so it can be
regenerated; a stored copy is secret material and never lies on disk in the clear."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsec.errors import SecurityError
from medsec.protections.aes import open_sealed_bytes, seal_file_bytes
from medsec.protections.keys import KeyRef

KEY_PURPOSE = "deepkeygen-key"


def save_key(path: str | Path, key: np.ndarray, generator_digest: str, key_ref: KeyRef) -> Path:
    """Seal a key image (AES-GCM, under ``key_ref``) with the digest of the generator that made it."""
    header = json.dumps({"generator_sha256": generator_digest, "shape": list(key.shape)}).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(seal_file_bytes(header + b"\n" + key.astype(np.uint8).tobytes(), key_ref, KEY_PURPOSE,
                                     name=path.name))
    return path


def load_key(path: str | Path, key_ref: KeyRef) -> tuple[np.ndarray, str]:
    """Open a sealed key image: (key image, digest of the generator that made it)."""
    path = Path(path)
    sealed = open_sealed_bytes(path.read_bytes(), key_ref, KEY_PURPOSE, f"key file {path}", name=path.name)
    header, _, raw = bytes(sealed).partition(b"\n")
    info = json.loads(header)
    key = np.frombuffer(raw, dtype=np.uint8)
    if key.size != int(np.prod(info["shape"])):
        raise SecurityError(f"key file {path}: the key image does not match its recorded shape")
    return key.reshape(info["shape"]), info["generator_sha256"]
