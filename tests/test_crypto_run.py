"""`crypto=aes` end to end: encrypt, train, eval, rotate, verify, and no key or plaintext image where
it must not be. Most steps run in-process; the command line is used where its output is checked."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsec import cli
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import ConfigError, DataError, SecurityError
from medsec.protections.keys import read_key_file
from medsec.protections.store import MANIFEST, RECORDS, live_dir
from tests.conftest import TINY, medsec_cli, read_metrics, run_verb

DATA = TINY[:2]
WORKERS = [o for o in TINY if not o.startswith("data.num_workers")] + ["data.num_workers=2"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A key file and the encrypted store of the tiny synthetic data set."""
    root = tmp_path_factory.mktemp("site")
    key_file, stores = root / "keys" / "site.key", root / "stores"
    refs = [f"crypto.key.file={key_file}", f"paths.store_dir={stores}"]
    run_verb("encrypt", ["action=keygen", *refs], root / "keygen")
    summary = run_verb("encrypt", [*DATA, *refs], root / "encrypt")
    assert summary["records"] == {"train": 192, "val": 64, "test": 64}
    return {"root": root, "refs": refs, "store": Path(summary["store"]), "key": read_key_file(key_file),
            "env": {"MEDSEC_KEY_FILE": str(key_file), "MEDSEC_STORE_DIR": str(stores)}}


def key_forms(key) -> list[bytes]:
    raw = bytes.fromhex(key.export_hex())
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]


@pytest.mark.slow
def test_encrypted_run_equals_plain_run_and_leaks_nothing(site: dict, tmp_path: Path) -> None:
    reference = run_verb("train", WORKERS, tmp_path / "plain")
    run = tmp_path / "sealed"
    result = medsec_cli("train", *WORKERS, "crypto=aes", "crypto.encrypt_checkpoints=true", "logger=many", f"hydra.run.dir={run}", cwd=site["root"], env={**site["env"], "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    sealed = read_metrics(run)
    for name in ("test/acc", "test/auroc", "val/auroc_best"):
        assert sealed[name] == pytest.approx(reference[name], abs=1e-6), name  # same data, order and model
    assert (run / "checkpoints" / "best.ckpt").read_bytes().startswith(b"MEDSEC-SEALED/2\n")

    files = [p for p in [*run.rglob("*"), *(site["root"] / "wandb").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    blobs = [p.read_bytes() for p in files] + [result.stdout.encode(), result.stderr.encode()]
    assert not [form for form in key_forms(site["key"]) for blob in blobs if form in blob]
    test_image = SyntheticSource(num_samples=[192, 64, 64], image_size=24).load().splits["test"][0]["image"]
    assert not [p for p, blob in zip(files, blobs) if np.asarray(test_image).tobytes()[:256] in blob]

    checkpoint = f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"
    with pytest.raises(ConfigError, match=r"is encrypted; add protect=\[aes\] \(or crypto=aes\)"):
        run_verb("eval", [checkpoint], tmp_path / "e1")
    evaluated = run_verb("eval", [checkpoint, "crypto=aes", "crypto.encrypt_outputs=true", *site["refs"]], tmp_path / "e2")
    assert evaluated["test/acc"] == pytest.approx(sealed["test/acc"], abs=1e-6)
    assert (tmp_path / "e2" / "predictions.csv.enc").is_file() and not (tmp_path / "e2" / "predictions.csv").exists()
    out = tmp_path / "predictions.csv"
    run_verb("encrypt", ["action=decrypt", f"input={tmp_path / 'e2' / 'predictions.csv.enc'}", f"output={out}",
                         *site["refs"]], tmp_path / "d")
    assert len(pd.read_csv(out)) == 64 and oct(out.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_ddp_trains_from_the_encrypted_store(site: dict, tmp_path: Path) -> None:
    result = medsec_cli("train", *WORKERS, "crypto=aes", "trainer=ddp_sim", "trainer.max_epochs=1",
                        f"hydra.run.dir={tmp_path}", cwd=site["root"], env=site["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "train_rank1.log").is_file() and read_metrics(tmp_path)["test/acc"] > 0.3


@pytest.mark.slow
def test_tampered_store_is_named_by_verify_and_by_training(site: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(site["store"], store)
    offset, length, _ = json.loads((live_dir(store) / MANIFEST).read_text())["records"]["train"][5]
    data = bytearray((live_dir(store) / RECORDS).read_bytes())
    data[offset + length - 3] ^= 0x80
    (live_dir(store) / RECORDS).write_bytes(bytes(data))
    with pytest.raises(SecurityError, match=r"1 damaged record\(s\):\n  record 5 of split 'train' \(id 'synthetic-train-000005'\) .*: its SHA-256 differs from the manifest and it fails AES-GCM authentication"):
        run_verb("encrypt", ["action=verify", f"crypto.store={store}", *site["refs"]], tmp_path / "v")
    # training decrypts in DataLoader workers: the error still ends in one line naming the record
    train = medsec_cli("train", *DATA, "data.num_workers=2", "trainer.max_epochs=1", "crypto=aes",
                       f"crypto.store={store}", "data.cache=false", f"hydra.run.dir={tmp_path / 't'}",
                       cwd=site["root"], env=site["env"], timeout=300)
    output = train.stdout + train.stderr
    assert train.returncode == 2, output[-3000:]
    assert "record 5 of split 'train'" in output and "failed authentication" in output and "Traceback" not in output


def test_rotation_replaces_the_key_atomically(site: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(site["store"], store)
    new_key = tmp_path / "new.key"
    run_verb("encrypt", ["action=keygen", f"crypto.key.file={new_key}"], tmp_path / "k")
    run_verb("encrypt", ["action=rotate", f"crypto.store={store}", f"new_key.file={new_key}", *site["refs"]], tmp_path / "r")
    assert json.loads((live_dir(store) / MANIFEST).read_text())["key_id"] == read_key_file(new_key).key_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "new.key", "r", "store"]  # nothing half-written left
    assert sorted(p.name for p in store.iterdir()) == ["CURRENT", "v2"]  # the new version, the old one removed
    with pytest.raises(SecurityError, match="wrong key"):
        run_verb("encrypt", ["action=verify", f"crypto.store={store}", *site["refs"]], tmp_path / "v1")
    report = run_verb("encrypt", ["action=verify", f"crypto.store={store}", *site["refs"], f"crypto.key.file={new_key}"],
                      tmp_path / "v2")
    assert report["records"] == {"train": 192, "val": 64, "test": 64}


def test_flag_aliases_become_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "hydra_app", lambda name, command: lambda: seen.append([name, *__import__("sys").argv]))
    assert cli.main(["encrypt", "--rotate", "crypto.store=/x"]) == 0
    assert seen == [["encrypt", "medsec encrypt", "action=rotate", "crypto.store=/x"]]


def test_crypto_refuses_image_logging_and_names_a_missing_store(site: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_images=true would send decrypted images"):
        run_verb("train", [*TINY, "crypto=aes", "log_images=true", *site["refs"]], tmp_path / "a")
    with pytest.raises(DataError, match="encrypted store not found: .*synthetic-.*medsec encrypt"):
        run_verb("train", [*TINY, "crypto=aes", "data.source.seed=7", *site["refs"]], tmp_path / "b")
    with pytest.raises(ConfigError, match="action must be one of"):
        run_verb("encrypt", ["action=shred", *site["refs"]], tmp_path / "c")
