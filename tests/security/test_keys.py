"""Key custody against untrusted inputs: what counts as a key, and how a key file is opened.

Each test is an attack on ``medsec.protections.keys``: a password passed off as a raw key, a weak key,
a key file that is a symlink, readable by others, owned by someone else, or not a file at all.
"""
from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from medsec.errors import ConfigError
from medsec.protections.keys import KeyRef, SecretKey, parse_key_text, read_key_file, write_key_file

MATERIAL = bytes(range(1, 33))


# ---- what counts as a key ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    b"correct horse battery staple!!!!",  # 32 characters: was taken as a raw 256-bit key
    b"Tr0ub4dor&3-Tr0ub4dor&3-Tr0ub4do",  # 32 characters, no spaces
    b"sixteen-chars-pw",                   # 16 characters: was taken as a raw 128-bit key
    bytes(range(200, 232)),                # 32 raw (binary) bytes: not text
    MATERIAL,                              # the same, a key's raw bytes
], ids=["passphrase-32", "password-32", "password-16", "binary-32", "raw-key-32"])
def test_a_password_or_raw_bytes_are_not_a_key(text: bytes) -> None:
    with pytest.raises(ConfigError, match="key file /k/a.key does not hold a 128- or 256-bit key") as err:
        parse_key_text(text, "key file /k/a.key")
    assert text.decode(errors="replace") not in str(err.value)
    assert repr(text) not in str(err.value)


@pytest.mark.parametrize("material", [bytes(32), bytes(16), b"\xff" * 32, b"\xab" * 16, b"\x01" * 32],
                         ids=["zero-256", "zero-128", "ff-256", "ab-128", "01-256"])
@pytest.mark.parametrize("encode", [bytes.hex, lambda m: base64.b64encode(m).decode()], ids=["hex", "base64"])
def test_all_zero_and_repeated_byte_keys_are_refused(material: bytes, encode) -> None:
    text = encode(material)
    with pytest.raises(ConfigError, match="environment variable K holds a weak key") as err:
        parse_key_text(text.encode(), "environment variable K")
    assert text not in str(err.value) and text.upper() not in str(err.value)


@pytest.mark.parametrize("size", [0, 1, 15, 17, 24, 31, 33, 64])
@pytest.mark.parametrize("encode", [bytes.hex, lambda m: base64.b64encode(m).decode()], ids=["hex", "base64"])
def test_only_128_and_256_bit_keys(size: int, encode) -> None:
    material = bytes((7 * i + 3) % 256 for i in range(size))
    text = encode(material)
    with pytest.raises(ConfigError, match="does not hold a 128- or 256-bit key") as err:
        parse_key_text(text.encode(), "k")
    assert not text or text not in str(err.value)


@pytest.mark.parametrize("text", [
    MATERIAL.hex(), MATERIAL.hex().upper(), "  " + MATERIAL.hex() + "\n", base64.b64encode(MATERIAL).decode() + "\n",
])
def test_hex_and_base64_keys_are_accepted(text: str) -> None:
    assert parse_key_text(text.encode(), "k") == SecretKey(MATERIAL)
    assert parse_key_text(MATERIAL[:16].hex().encode(), "k").bits == 128


@pytest.mark.parametrize("text", [
    MATERIAL.hex()[:32] + " " + MATERIAL.hex()[32:],       # inner whitespace
    MATERIAL.hex() + "\n" + MATERIAL.hex(),                # two keys
    base64.urlsafe_b64encode(b"\xfb" * 31 + b"\xfe").decode(),  # URL-safe alphabet
    "0x" + MATERIAL.hex()[2:],
])
def test_malformed_key_text_is_refused_without_quoting_it(text: str) -> None:
    with pytest.raises(ConfigError, match="does not hold a 128- or 256-bit key") as err:
        parse_key_text(text.encode(), "k")
    assert MATERIAL.hex()[4:20] not in str(err.value) and text not in str(err.value)


def test_env_key_that_is_a_password_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    password = "correct horse battery staple!!!!"
    monkeypatch.setenv("SEC_TEST_KEY", password)
    with pytest.raises(ConfigError, match="environment variable SEC_TEST_KEY does not hold") as err:
        KeyRef(source="env", env="SEC_TEST_KEY").load()
    assert password not in str(err.value)


# ---- key files -----------------------------------------------------------------------------------
@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key_file(tmp_path / "keys" / "a.key", SecretKey(MATERIAL))


def test_key_file_round_trip(key_file: Path) -> None:
    assert read_key_file(key_file) == SecretKey(MATERIAL)
    assert KeyRef(file=str(key_file)).load() == SecretKey(MATERIAL)


def test_symlinked_key_file_is_refused(key_file: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    with pytest.raises(ConfigError, match=r"train.key.file: key file .*link.key is a symbolic link") as err:
        KeyRef(file=str(link), field="train.key").load()
    assert MATERIAL.hex() not in str(err.value)
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere.key")
    with pytest.raises(ConfigError, match=r"crypto.key.file: key file .*dangling.key is a symbolic link"):
        read_key_file(dangling)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644, 0o606])
def test_key_file_accessible_to_group_or_others_is_refused(key_file: Path, mode: int) -> None:
    os.chmod(key_file, mode)
    with pytest.raises(ConfigError, match=rf"crypto.key.file: .*a.key is accessible to group/others "
                                          rf"\(mode {mode:04o}\).*chmod 600"):
        read_key_file(key_file)


def test_key_file_owned_by_another_user_is_refused(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = key_file.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000)
    with pytest.raises(ConfigError, match=rf"crypto.key.file: .*a.key is owned by uid {owner}, not by the "
                                          rf"current user \(uid {owner + 1000}\)"):
        read_key_file(key_file)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)  # opening a FIFO for reading blocks until a writer comes, unless non-blocking
    with pytest.raises(ConfigError, match=r"crypto.key.file: key file .*key.fifo is not a regular file"):
        read_key_file(fifo)


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keydir"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"crypto.key.file: key file .*keydir is not a regular file"):
        read_key_file(folder)


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"crypto.key.file: key file not found: .*missing.key"):
        read_key_file(tmp_path / "missing.key")


def test_oversized_key_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    big = tmp_path / "big.key"
    big.write_bytes(MATERIAL.hex().encode() * 100_000)
    os.chmod(big, 0o600)
    with pytest.raises(ConfigError, match=r"big.key is too large to be a key file"):
        read_key_file(big)


def test_key_file_holding_a_password_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pw.key"
    path.write_text("correct horse battery staple!!!!\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=r"key file .*pw.key does not hold a 128- or 256-bit key") as err:
        read_key_file(path)
    assert "horse" not in str(err.value)


def test_key_file_is_checked_and_read_through_one_descriptor(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No check-then-open race: the file is opened once, without following a symlink, and the checks
    are made on the open descriptor (``fstat``), never on the path."""
    opened: list[int] = []
    real_open, real_fstat = os.open, os.fstat
    checked: list[int] = []

    def spy_open(path, flags, *args, **kwargs):
        opened.append(flags)
        return real_open(path, flags, *args, **kwargs)

    def spy_fstat(fd):
        checked.append(fd)
        return real_fstat(fd)

    def no_path_stat(*args, **kwargs):
        raise AssertionError("the key file was checked by path, not through its descriptor")

    with monkeypatch.context() as patch:  # undone before pytest itself needs os.stat again
        patch.setattr(os, "open", spy_open)
        patch.setattr(os, "fstat", spy_fstat)
        for name in ("stat", "lstat"):
            patch.setattr(os, name, no_path_stat)
        for name in ("stat", "is_file", "exists"):
            patch.setattr(Path, name, no_path_stat)
        try:
            key = read_key_file(key_file)
        except AssertionError as err:
            failure = str(err)
        else:
            failure = ""
    assert not failure
    assert key == SecretKey(MATERIAL)
    assert len(opened) == 1 and opened[0] & os.O_NOFOLLOW and opened[0] & os.O_CLOEXEC
    assert opened[0] & (os.O_WRONLY | os.O_RDWR) == 0 and checked


def test_write_key_file_gives_an_owner_only_regular_file(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "new" / "b.key", SecretKey(MATERIAL))
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
