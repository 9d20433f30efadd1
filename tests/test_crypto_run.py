"""`crypto=aes` end to end through the command line: encrypt, train, eval, rotate, verify, and no
key or plaintext image where it must not be."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsec.crypto.keys import read_key_file
from medsec.crypto.store import MANIFEST, RECORDS
from tests.conftest import TINY, medsec_cli, read_metrics

SMALL = [o for o in TINY if not o.startswith("data.num_workers")] + ["data.num_workers=2"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A key file and the encrypted store of the tiny synthetic data set, made with the CLI."""
    root = tmp_path_factory.mktemp("site")
    env = {"MEDSEC_KEY_FILE": str(root / "keys" / "site.key"), "MEDSEC_STORE_DIR": str(root / "stores")}
    for args in (["action=keygen"], [*SMALL[:2]]):
        result = medsec_cli("encrypt", *args, f"hydra.run.dir={root / 'encrypt'}", env=env, cwd=root, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    (store,) = (root / "stores").iterdir()
    return {"root": root, "env": env, "store": store, "key": read_key_file(env["MEDSEC_KEY_FILE"])}


def key_forms(key) -> list[bytes]:
    raw = bytes.fromhex(key.export_hex())
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]


def assert_no_key_in(paths: list[Path], texts: list[str], key) -> None:
    forms = key_forms(key)
    blobs = [p.read_bytes() for p in paths if p.is_file()] + [t.encode() for t in texts]
    assert blobs
    for blob in blobs:
        assert not any(form in blob for form in forms)


@pytest.mark.slow
def test_encrypted_run_equals_plain_run_and_leaks_no_key(site: dict, tmp_path: Path) -> None:
    plain = medsec_cli("train", *SMALL, f"hydra.run.dir={tmp_path / 'plain'}", cwd=site["root"], env=site["env"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    run = tmp_path / "sealed"
    result = medsec_cli("train", *SMALL, "crypto=aes", "crypto.encrypt_checkpoints=true", "crypto.encrypt_outputs=true",
                        "logger=many", f"hydra.run.dir={run}", cwd=site["root"], env={**site["env"], "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    sealed, reference = read_metrics(run), read_metrics(tmp_path / "plain")
    for name in ("test/acc", "test/auroc", "val/auroc_best"):
        assert sealed[name] == pytest.approx(reference[name], abs=1e-6), name  # same data, same order, same model
    assert (run / "checkpoints" / "best.ckpt").read_bytes().startswith(b"MEDSEC-SEALED/1\n")
    assert (run / "predictions.csv.enc").is_file() and not (run / "predictions.csv").exists()
    files = [p for p in run.rglob("*")] + [p for p in (site["root"] / "wandb").rglob("*") if p.is_file()]
    assert_no_key_in(files, [result.stdout, result.stderr], site["key"])
    # no plaintext image on disk: a test image's pixels appear in no file the run wrote
    image = np.asarray(__import__("medsec.data.sources.synthetic", fromlist=["x"]).SyntheticSource(
        num_samples=[192, 64, 64], image_size=24).load().splits["test"][0]["image"])
    needle = image.tobytes()[:256]
    assert not any(needle in p.read_bytes() for p in files if p.is_file())

    denied = medsec_cli("eval", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={tmp_path / 'e1'}",
                        cwd=site["root"], env=site["env"])
    assert denied.returncode == 2 and "is encrypted; add crypto=aes" in denied.stderr + denied.stdout
    evaluated = medsec_cli("eval", "crypto=aes", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                           f"hydra.run.dir={tmp_path / 'e2'}", cwd=site["root"], env=site["env"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert read_metrics(tmp_path / "e2")["test/acc"] == pytest.approx(sealed["test/acc"], abs=1e-6)
    out = tmp_path / "predictions.csv"
    opened = medsec_cli("encrypt", "action=decrypt", f"input={tmp_path / 'e2' / 'predictions.csv.enc'}", f"output={out}",
                        f"hydra.run.dir={tmp_path / 'd'}", cwd=site["root"], env=site["env"])
    assert opened.returncode == 0, opened.stderr[-3000:]
    assert len(pd.read_csv(out)) == 64 and oct(out.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_ddp_trains_from_the_encrypted_store(site: dict, tmp_path: Path) -> None:
    result = medsec_cli("train", *SMALL, "crypto=aes", "trainer=ddp_sim", "trainer.max_epochs=1",
                        f"hydra.run.dir={tmp_path}", cwd=site["root"], env=site["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "train_rank1.log").is_file() and read_metrics(tmp_path)["test/acc"] > 0.3


def test_tampered_store_is_named_by_verify_and_by_training(site: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    import shutil

    shutil.copytree(site["store"], store)
    manifest = json.loads((store / MANIFEST).read_text())
    _, offset, length, _ = manifest["records"]["train"][5]
    data = bytearray((store / RECORDS).read_bytes())
    data[offset + length - 3] ^= 0x80
    (store / RECORDS).write_bytes(bytes(data))
    verify = medsec_cli("encrypt", "--verify", f"crypto.store={store}", f"hydra.run.dir={tmp_path / 'v'}",
                        cwd=site["root"], env=site["env"], timeout=120)
    assert verify.returncode == 2
    assert "record 5 of split 'train' (id 'synthetic-train-000005')" in verify.stderr + verify.stdout
    train = medsec_cli("train", *SMALL[:2], "data.num_workers=2", "trainer.max_epochs=1", "crypto=aes",
                       f"crypto.store={store}", "data.cache=false", f"hydra.run.dir={tmp_path / 't'}",
                       cwd=site["root"], env=site["env"], timeout=300)
    output = train.stdout + train.stderr
    assert train.returncode == 2, output[-3000:]
    assert "record 5 of split 'train'" in output and "failed authentication" in output and "Traceback" not in output


def test_rotation_replaces_the_key(site: dict, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "store"
    shutil.copytree(site["store"], store)
    new_key = tmp_path / "new.key"
    env = {**site["env"], "MEDSEC_NEW_KEY_FILE": str(new_key)}
    made = medsec_cli("encrypt", "action=keygen", f"crypto.key.file={new_key}", f"hydra.run.dir={tmp_path / 'k'}",
                      cwd=site["root"], env=env, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    rotated = medsec_cli("encrypt", "--rotate", f"crypto.store={store}", f"hydra.run.dir={tmp_path / 'r'}",
                         cwd=site["root"], env=env, timeout=120)
    assert rotated.returncode == 0, rotated.stderr[-2000:]
    assert json.loads((store / MANIFEST).read_text())["key_id"] == read_key_file(new_key).key_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "new.key", "r", "store"]  # nothing half-written left
    old = medsec_cli("encrypt", "--verify", f"crypto.store={store}", f"hydra.run.dir={tmp_path / 'v1'}",
                     cwd=site["root"], env=env, timeout=120)
    assert old.returncode == 2 and "wrong key" in old.stderr + old.stdout
    new = medsec_cli("encrypt", "--verify", f"crypto.store={store}", f"crypto.key.file={new_key}",
                     f"hydra.run.dir={tmp_path / 'v2'}", cwd=site["root"], env=env, timeout=120)
    assert new.returncode == 0, new.stderr[-2000:]
    report = json.loads((tmp_path / "v2" / "encrypt_report.json").read_text())
    assert report["records"] == {"train": 192, "val": 64, "test": 64}


def test_crypto_refuses_image_logging_and_names_a_missing_store(site: dict, tmp_path: Path) -> None:
    logged = medsec_cli("train", *SMALL, "crypto=aes", "log_images=true", f"hydra.run.dir={tmp_path / 'a'}",
                        cwd=site["root"], env=site["env"], timeout=120)
    assert logged.returncode == 2 and "log_images=true would send decrypted images" in logged.stderr + logged.stdout
    missing = medsec_cli("train", "crypto=aes", "data.source.seed=7", f"hydra.run.dir={tmp_path / 'b'}",
                         cwd=site["root"], env=site["env"], timeout=120)
    assert missing.returncode == 2 and "encrypted store not found" in missing.stderr + missing.stdout
