"""Key custody: where keys come from (file, environment, passphrase), how they are named, and how
they stay out of configs, logs, checkpoints, exceptions and ``repr``.

Configs carry a :class:`KeyRef` (a file path or the *name* of an environment variable), never key
material. A master key is 256 bits (128 accepted for AES-128), given as hex or base64 text; every
use derives its own sub-key with HKDF-SHA256 (the info names the purpose *and* the sub-key length,
so an AES-128 key is not a prefix of the AES-256 key for the same purpose), and the key id shown to
users is itself an HKDF output, so it reveals nothing.

Everything read from outside is untrusted until checked: key text (hex/base64 only, exactly 128 or
256 bits, not a weak key), key files (opened once without following a symlink, then checked on the
open descriptor: a regular file of the current user, mode 600) and scrypt parameters, which come
from unauthenticated headers and are checked against a fixed, bounded set before scrypt runs.
"""
from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InternalError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from medsec.errors import ConfigError, SecurityError

KEY_BYTES = 32
KEY_SIZES = (16, 32)
KEY_SOURCES = ("file", "env", "passphrase")
HKDF_VERSION = b"medsec/v2/"
MAX_KEY_FILE_BYTES = 4096
"""A key file is one line of hex or base64; anything larger is not a key file."""
SCRYPT_DEFAULTS = {"n": 2**17, "r": 8, "p": 1}
"""scrypt cost of new passphrase-derived keys (data at rest: N = 2^17, 128 MiB and about 0.3 s per
derivation; N = 2^15 is RFC 7914's interactive-login setting, too cheap for stored data)."""
SCRYPT_FIELDS = ("name", "salt", "n", "r", "p")
SCRYPT_SALT_BYTES = 16
SCRYPT_N_RANGE = (2**15, 2**18)
"""The scrypt ``n`` accepted when *reading* (files written before N = 2^17 used 2^15); anything
else is refused before scrypt runs, since the parameters come from unauthenticated headers."""
_HEX_SALT = re.compile(rf"[0-9a-fA-F]{{{2 * SCRYPT_SALT_BYTES}}}")


class KdfParamsError(SecurityError, ConfigError):
    """Refused or failing scrypt parameters. Both a :class:`SecurityError` (they come from an
    unauthenticated header) and a :class:`ConfigError` (callers may catch either)."""


class SecretKey:
    """Master key material that never shows itself: ``repr``/``str`` give only the key id.

    Use :meth:`derive` to get a purpose-bound sub-key; the raw material is not exposed.
    """

    __slots__ = ("_material", "key_id")

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, (bytes, bytearray)) or len(material) not in KEY_SIZES:
            raise ConfigError(f"a key must be 16 or 32 bytes, got {len(material)} bytes"
                              if isinstance(material, (bytes, bytearray)) else "a key must be 16 or 32 bytes")
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
        """HKDF-SHA256 sub-key of ``length`` bytes for ``purpose``. The info is
        ``medsec/v2/<purpose>/<8 * length>-bit``: different purposes *or lengths* give independent
        keys (without the length, the 16-byte sub-key would be a prefix of the 32-byte one)."""
        info = HKDF_VERSION + purpose.encode() + b"/" + str(8 * length).encode() + b"-bit"
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(self._material)

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


def _decode_key_text(text: bytes) -> bytes | None:
    """The key bytes of hex or (standard, padded) base64 text, if it is one of them and 128 or 256
    bits long. Hex of a 128/256-bit key is never valid base64 of one, and vice versa."""
    for decode in (binascii.unhexlify, lambda t: base64.b64decode(t, validate=True)):
        try:
            material = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(material) in KEY_SIZES:
            return material
    return None


def parse_key_text(raw: bytes, where: str) -> SecretKey:
    """A key from hex or base64 text: exactly 128 or 256 bits, and not a weak key (all bytes
    equal, as the all-zero key). Raw bytes are not accepted (a 32-character password would pass
    for a 256-bit key). ``where`` names the source in errors, which never quote the content."""
    material = _decode_key_text(raw.strip())
    if material is None:
        raise ConfigError(f"{where} does not hold a 128- or 256-bit key as hex or base64 text "
                          "(a password is not a key: use crypto.key.source=passphrase, or make a key with "
                          "`medsec encrypt action=keygen`)")
    if len(set(material)) == 1:
        raise ConfigError(f"{where} holds a weak key (every byte the same, as in an all-zero key); "
                          "make a random one with `medsec encrypt action=keygen`")
    return SecretKey(material)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
"""Read-only, never through a symlink, not inherited by child processes, and not blocking on a FIFO
(whose open would otherwise wait for a writer)."""


def read_private_file(path: str | Path, field: str, what: str = "key file", max_bytes: int = MAX_KEY_FILE_BYTES,
                      hint: str = "(create one with `medsec encrypt action=keygen`)") -> bytes:
    """The bytes of a secret file (a key file, a CKKS site context). It is opened once (a symlink is
    refused) and checked on the open descriptor, so what is checked is what is read: a regular file,
    owned by the current user, that group and others can neither read nor write (mode 600 or 400),
    at most ``max_bytes`` long. Errors name ``field`` (e.g. ``crypto.key.file``) and ``what`` it is."""
    path = Path(path).expanduser()
    name = f"{field}: {what} {path}"
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ConfigError(f"{field}: {what} not found: {path} {hint}") from None
    except OSError as err:
        if err.errno in (errno.ELOOP, getattr(errno, "EMLINK", -1)):  # O_NOFOLLOW met a symlink
            raise ConfigError(f"{name} is a symbolic link; refusing to follow it (set {field} to the "
                              f"{what} itself)") from None
        raise ConfigError(f"{name} cannot be opened ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{name} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(f"{field}: {path} is accessible to group/others (mode {mode:04o}); "
                              f"run `chmod 600 {path}`")
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            raise ConfigError(f"{field}: {path} is owned by uid {info.st_uid}, not by the current user "
                              f"(uid {os.geteuid()}); a {what} must belong to the user who reads it")
        if info.st_size > max_bytes:
            raise ConfigError(f"{field}: {path} is too large to be a {what} ({info.st_size} bytes)")
        data = b""
        while chunk := os.read(fd, max_bytes + 1 - len(data)):
            data += chunk
            if len(data) > max_bytes:
                raise ConfigError(f"{field}: {path} is too large to be a {what}")
    finally:
        os.close(fd)
    return data


def read_key_file(path: str | Path, field: str = "crypto.key") -> SecretKey:
    """Read a key file (:func:`read_private_file`: mode 600/400, owned by the reader, no symlink)."""
    path = Path(path).expanduser()
    data = read_private_file(path, f"{field}.file")
    return parse_key_text(data, f"key file {path}")


def write_private_file(path: str | Path, data: bytes, what: str) -> Path:
    """Write ``data`` to a new file readable by its owner only (mode 600, parent folder 700);
    never overwrites (``what`` names the file in the error: "key file", "site context")."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{what} {path} already exists; refusing to overwrite a secret") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def write_key_file(path: str | Path, key: SecretKey) -> Path:
    """Write ``key`` as hex to a new file readable by its owner only; never overwrites."""
    return write_private_file(path, (key.export_hex() + "\n").encode(), "key file")


def new_kdf_params() -> dict[str, Any]:
    """Fresh scrypt parameters (random salt, N = 2^17) for a new passphrase-derived key."""
    return {"name": "scrypt", "salt": secrets.token_hex(SCRYPT_SALT_BYTES), **SCRYPT_DEFAULTS}


def _show(value: int) -> int | str:
    """An integer for a message (a huge one may not even convert to text)."""
    return value if abs(value) <= 2**64 else "a number out of range"


def _kdf_problem(kdf: Any) -> str | None:
    """Why ``kdf`` is not an accepted set of scrypt parameters, or ``None``."""
    if not isinstance(kdf, Mapping):
        return f"scrypt parameters are not a JSON object (got {type(kdf).__name__})"
    missing = [name for name in SCRYPT_FIELDS if name not in kdf]
    if missing:
        return f"scrypt parameter(s) {missing} missing"
    extra = sorted(str(name)[:32] for name in kdf if name not in SCRYPT_FIELDS)
    if extra:
        return f"unknown scrypt parameter(s) {extra[:5]} (accepted: {list(SCRYPT_FIELDS)})"
    if kdf["name"] != "scrypt":
        return "scrypt parameter 'name' must be 'scrypt'"
    salt = kdf["salt"]
    if not isinstance(salt, str) or not _HEX_SALT.fullmatch(salt):
        return f"scrypt parameter 'salt' must be {SCRYPT_SALT_BYTES} bytes as hex ({2 * SCRYPT_SALT_BYTES} hex digits)"
    for name in ("n", "r", "p"):  # bool is an int subclass, and True == 1: exact type
        if type(kdf[name]) is not int:
            return f"scrypt parameter '{name}' must be an integer, got {type(kdf[name]).__name__}"
    low, high = SCRYPT_N_RANGE
    n = kdf["n"]
    if not (low <= n <= high and n & (n - 1) == 0):
        return f"scrypt parameter 'n' must be a power of two from 2^15 to 2^20, got {_show(n)}"
    for name, allowed in (("r", 8), ("p", 1)):
        if kdf[name] != allowed:
            return f"scrypt parameter '{name}' must be {allowed}, got {_show(kdf[name])}"
    return None


def check_kdf_params(kdf: Any, where: str = "scrypt parameters (header field 'kdf')",
                     error: type[Exception] = KdfParamsError) -> dict[str, Any]:
    """Check scrypt parameters read from a header (unauthenticated until the key they give is
    used) against the fixed set medsec accepts: name ``scrypt``, a 16-byte hex salt, ``r = 8``,
    ``p = 1`` and ``n`` a power of two from 2^15 to 2^20; returns them as a plain dict. Anything
    else raises ``error`` (default :class:`KdfParamsError`) naming ``where`` and the field, before
    any memory or time is spent on scrypt."""
    problem = _kdf_problem(kdf)
    if problem is not None:
        raise error(f"{where}: {problem}")
    return {name: kdf[name] for name in SCRYPT_FIELDS}


def passphrase_key(passphrase: str, kdf: Mapping[str, Any],
                   where: str = "scrypt parameters (header field 'kdf')") -> SecretKey:
    """Derive a 256-bit key from a passphrase with scrypt and the stored parameters ``kdf``,
    checked first (:func:`check_kdf_params`; ``where`` names them in errors)."""
    if not passphrase:
        raise ConfigError("the passphrase is empty")
    params = check_kdf_params(kdf, where)
    n, r, p = params["n"], params["r"], params["p"]
    try:
        material = Scrypt(salt=bytes.fromhex(params["salt"]), length=KEY_BYTES, n=n, r=r, p=p).derive(
            passphrase.encode())
    except (MemoryError, InternalError, ValueError, OverflowError) as err:
        reason = "not enough memory" if isinstance(err, MemoryError) else type(err).__name__
        raise KdfParamsError(f"{where}: scrypt could not derive the key (n=2^{n.bit_length() - 1}, r={r}, p={p}; "
                             f"{reason})") from None
    return SecretKey(material)


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

    def load(self, kdf: Mapping[str, Any] | None = None,
             where: str = "scrypt parameters (header field 'kdf')") -> SecretKey:
        """Resolve the reference. Passphrase keys need the ``kdf`` parameters of the file they open
        (or :func:`new_kdf_params` for a new one), checked before use; ``where`` names them in
        errors."""
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
        return passphrase_key(value, kdf, where)
