"""Key custody: where keys come from (file, environment, passphrase), how they are named, and how
they stay out of configs, logs, checkpoints, exceptions and ``repr``.

Configs carry a :class:`KeyRef` (a file path or the *name* of an environment variable), never key
material. A master key is 256 bits (128 accepted for AES-128); every use derives its own sub-key
with HKDF-SHA256, and the key id shown to users is itself an HKDF output, so it reveals nothing.
"""
from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from medsec.errors import ConfigError

KEY_BYTES = 32
KEY_SOURCES = ("file", "env", "passphrase")
SCRYPT_DEFAULTS = {"n": 2**15, "r": 8, "p": 1}
"""scrypt cost (about 0.1 s and 32 MiB per derivation): the interactive-login setting of RFC 7914."""


class SecretKey:
    """Master key material that never shows itself: ``repr``/``str`` give only the key id.

    Use :meth:`derive` to get a purpose-bound sub-key; the raw material is not exposed.
    """

    __slots__ = ("_material", "key_id")

    def __init__(self, material: bytes) -> None:
        if len(material) not in (16, 32):
            raise ConfigError(f"a key must be 16 or 32 bytes, got {len(material)} bytes")
        self._material = bytes(material)
        self.key_id = self.derive("key-id", 8).hex()

    @classmethod
    def generate(cls) -> SecretKey:
        """A fresh random 256-bit key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def bits(self) -> int:
        return 8 * len(self._material)

    def derive(self, purpose: str, length: int) -> bytes:
        """HKDF-SHA256 sub-key for ``purpose`` (different purposes give independent keys)."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                    info=b"medsec/v1/" + purpose.encode()).derive(self._material)

    def export_hex(self) -> str:
        """The key as hex, for writing a key file (:func:`write_key_file`) only."""
        return self._material.hex()

    def __repr__(self) -> str:
        return f"SecretKey(id={self.key_id}, {self.bits} bits)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and secrets.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self.key_id)


def parse_key_text(raw: bytes, where: str) -> SecretKey:
    """A key from hex or base64 text, or raw bytes (16 or 32). ``where`` names the source in errors,
    which never quote the content."""
    text = raw.strip()
    candidates: list[bytes] = []
    try:
        candidates.append(binascii.unhexlify(text))
    except (binascii.Error, ValueError):
        pass
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    candidates.append(raw)
    for material in candidates:
        if len(material) in (16, 32):
            return SecretKey(material)
    raise ConfigError(f"{where} does not hold a 128- or 256-bit key (hex, base64 or raw bytes)")


def read_key_file(path: str | Path, field: str = "crypto.key") -> SecretKey:
    """Read a key file, refusing one that group or others may read or write."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}.file: key file not found: {path} (create one with `medsec encrypt action=keygen`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{field}.file: {path} is accessible to group/others (mode {mode:04o}); "
                          f"run `chmod 600 {path}`")
    return parse_key_text(path.read_bytes(), f"key file {path}")


def write_key_file(path: str | Path, key: SecretKey) -> Path:
    """Write ``key`` as hex to a new file readable by its owner only; never overwrites."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(key.export_hex() + "\n")
    return path


def new_kdf_params() -> dict[str, Any]:
    """Fresh scrypt parameters (random salt) for a passphrase-derived key."""
    return {"name": "scrypt", "salt": secrets.token_hex(16), **SCRYPT_DEFAULTS}


def passphrase_key(passphrase: str, kdf: Mapping[str, Any]) -> SecretKey:
    """Derive a 256-bit key from a passphrase with scrypt and the stored parameters."""
    if not passphrase:
        raise ConfigError("the passphrase is empty")
    try:
        scrypt = Scrypt(salt=bytes.fromhex(kdf["salt"]), length=KEY_BYTES, n=int(kdf["n"]), r=int(kdf["r"]),
                        p=int(kdf["p"]))
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"invalid scrypt parameters in the encrypted file's header ({err})") from None
    return SecretKey(scrypt.derive(passphrase.encode()))


@dataclass(frozen=True)
class KeyRef:
    """Where a key comes from. Only this reference is ever stored in configs and checkpoints.

    Args:
        source: ``file`` (a key file, mode 600), ``env`` (an environment variable holding the key
            as hex or base64) or ``passphrase`` (an environment variable holding a passphrase,
            stretched with scrypt; the salt travels in each encrypted file's header).
        file: key file path (``source=file``).
        env: name of the variable holding the key (``source=env``).
        passphrase_env: name of the variable holding the passphrase (``source=passphrase``).
    """

    source: str = "file"
    file: str | None = None
    env: str | None = "MEDSEC_KEY"
    passphrase_env: str | None = "MEDSEC_PASSPHRASE"
    field: str = "crypto.key"
    """The config field this reference came from, for messages."""

    def __post_init__(self) -> None:
        if self.source not in KEY_SOURCES:
            raise ConfigError(f"{self.field}.source must be one of {list(KEY_SOURCES)}, got '{self.source}'")
        needed = {"file": "file", "env": "env", "passphrase": "passphrase_env"}[self.source]
        if not getattr(self, needed):
            raise ConfigError(f"{self.field}.{needed} must be set for {self.field}.source={self.source}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | KeyRef, field: str = "crypto.key") -> KeyRef:
        if isinstance(cfg, KeyRef):
            return cfg
        unknown = set(cfg) - {"source", "file", "env", "passphrase_env"}
        if unknown:
            raise ConfigError(f"{field}: unknown field(s) {sorted(unknown)}")
        return cls(**dict(cfg), field=field)

    def describe(self) -> str:
        """Where the key comes from, for messages (never the key)."""
        return {"file": f"key file {self.file}", "env": f"environment variable {self.env}",
                "passphrase": f"passphrase in environment variable {self.passphrase_env}"}[self.source]

    @property
    def needs_kdf(self) -> bool:
        return self.source == "passphrase"

    def load(self, kdf: Mapping[str, Any] | None = None) -> SecretKey:
        """Resolve the reference. Passphrase keys need the ``kdf`` parameters of the file they open
        (or :func:`new_kdf_params` for a new one)."""
        if self.source == "file":
            return read_key_file(self.file, self.field)
        name = self.env if self.source == "env" else self.passphrase_env
        value = os.environ.get(name or "")
        if not value:
            raise ConfigError(f"{self.field}: environment variable {name} is not set ({self.describe()})")
        if self.source == "env":
            return parse_key_text(value.encode(), f"environment variable {name}")
        if kdf is None:
            raise ConfigError("a passphrase key needs the scrypt parameters of the file it opens")
        return passphrase_key(value, kdf)
