"""Keys and stages for the crypto tests: a fresh key file per test, never a shared secret."""
from __future__ import annotations

from pathlib import Path

import pytest

from medsec.protections import AESStage, KeyRef, SecretKey
from medsec.protections.keys import write_key_file


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key_file(tmp_path / "keys" / "test.key", SecretKey.generate())


@pytest.fixture
def key_ref(key_file: Path) -> KeyRef:
    return KeyRef(source="file", file=str(key_file))


@pytest.fixture
def stage(key_ref: KeyRef, tmp_path: Path) -> AESStage:
    return AESStage(key=key_ref, store_root=tmp_path / "stores")
