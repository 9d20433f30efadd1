"""Key sources, key ids and redaction."""
from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest

from medsec.errors import ConfigError
from medsec.protections.keys import (
    KeyRef,
    SecretKey,
    new_kdf_params,
    parse_key_text,
    passphrase_key,
    write_key_file,
)

MATERIAL = bytes(range(32))


def test_repr_and_str_show_only_the_key_id() -> None:
    key = SecretKey(MATERIAL)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert MATERIAL.hex() not in text and base64.b64encode(MATERIAL).decode() not in text
        assert key.key_id in text
    assert len(key.key_id) == 16 and key.key_id == SecretKey(MATERIAL).key_id
    assert key.key_id != SecretKey(bytes(32)).key_id


def test_sub_keys_are_independent_per_purpose() -> None:
    key = SecretKey(MATERIAL)
    a, b = key.derive("records", 32), key.derive("manifest", 32)
    assert a != b and MATERIAL not in (a, b) and key.derive("records", 32) == a


@pytest.mark.parametrize("text", [MATERIAL.hex().encode() + b"\n", base64.b64encode(MATERIAL)])
def test_key_text_formats(text: bytes) -> None:
    assert parse_key_text(text, "k") == SecretKey(MATERIAL)


def test_raw_key_bytes_are_not_key_text() -> None:
    with pytest.raises(ConfigError, match="does not hold a 128- or 256-bit key as hex or base64"):
        parse_key_text(MATERIAL, "k")


def test_bad_key_text_does_not_quote_the_content() -> None:
    with pytest.raises(ConfigError, match="does not hold a 128- or 256-bit key") as err:
        parse_key_text(b"secret-but-wrong-length", "key file /x")
    assert "secret-but" not in str(err.value)


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    key = SecretKey.generate()
    path = write_key_file(tmp_path / "k" / "a.key", key)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert KeyRef(file=str(path)).load() == key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_key_file(path, SecretKey.generate())
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match=r"accessible to group/others \(mode 0640\).*chmod 600"):
        KeyRef(file=str(path)).load()
    with pytest.raises(ConfigError, match="key file not found: .*missing.key"):
        KeyRef(file=str(tmp_path / "missing.key")).load()


def test_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MEDSEC_KEY", base64.b64encode(MATERIAL).decode())
    assert KeyRef(source="env", env="TEST_MEDSEC_KEY").load() == SecretKey(MATERIAL)
    with pytest.raises(ConfigError, match="environment variable UNSET_MEDSEC_KEY is not set"):
        KeyRef(source="env", env="UNSET_MEDSEC_KEY").load()


def test_passphrase_key_depends_on_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PASS", "correct horse battery staple")
    kdf = new_kdf_params() | {"n": 2**15}  # the cheapest cost still read (files before N = 2^17)
    ref = KeyRef(source="passphrase", passphrase_env="TEST_PASS")
    assert ref.load(kdf) == passphrase_key("correct horse battery staple", kdf)
    assert ref.load(kdf) != ref.load(new_kdf_params() | {"n": 2**15})
    with pytest.raises(ConfigError, match="needs the scrypt parameters"):
        ref.load()


def test_key_ref_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"crypto.key.source must be one of"):
        KeyRef(source="vault")
    with pytest.raises(ConfigError, match=r"new_key.file must be set for new_key.source=file"):
        KeyRef.from_config({"source": "file", "file": None}, field="new_key")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['value'\]"):
        KeyRef.from_config({"source": "env", "value": "00"})


def test_key_survives_pickling_for_workers_but_not_in_text() -> None:
    key = SecretKey(MATERIAL)
    assert pickle.loads(pickle.dumps(key)) == key
