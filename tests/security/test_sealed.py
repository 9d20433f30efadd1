"""Sealed checkpoints and outputs: bound to their name and run, required when sealing is on, and
every per-run output that depends on individual cases sealed with ``encrypt_outputs=true``."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from medsec.errors import ConfigError, SecurityError
from medsec.protections import AESStage, KeyRef
from medsec.utils.outputs import RUN_FILE, ensure_run_id
from tests.conftest import TINY, run_verb

DATA = TINY[:2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("site")
    key_file = root / "keys" / "site.key"
    refs = [f"crypto.key.file={key_file}", f"paths.store_dir={root / 'stores'}"]
    run_verb("encrypt", ["action=keygen", *refs], root / "keygen")
    run_verb("encrypt", [*DATA, *refs], root / "encrypt")
    return {"root": root, "refs": refs, "stage": AESStage(key=KeyRef(file=str(key_file)), store_root=root / "stores")}


@pytest.fixture(scope="module")
def sealed_run(site: dict) -> Path:
    run = site["root"] / "sealed"
    run_verb("train", [*TINY, "crypto=aes", "crypto.encrypt_checkpoints=true", "crypto.encrypt_outputs=true",
                       *site["refs"]], run)
    return run


def test_encrypt_outputs_leaves_no_case_dependent_file_in_clear(sealed_run: Path, site: dict) -> None:
    files = sorted(p.relative_to(sealed_run).as_posix() for p in sealed_run.rglob("*") if p.is_file())
    clear = [f for f in files if not f.endswith(".enc") and not f.startswith("checkpoints/")]
    assert clear == ["config.yaml", RUN_FILE], clear
    for expected in ("metrics.json.enc", "predictions.csv.enc", "plots/roc_curves.png.enc",
                     "plots/confusion_matrix.png.enc", "csv/metrics.csv.enc"):
        assert expected in files, files
    metrics = json.loads(site["stage"].open(sealed_run / "metrics.json.enc", "output"))
    assert 0 <= metrics["test/acc"] <= 1
    assert site["stage"].open(sealed_run / "plots" / "roc_curves.png.enc", "output")[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"test/acc" in site["stage"].open(sealed_run / "csv" / "metrics.csv.enc", "output")


def test_swapped_or_foreign_sealed_checkpoints_are_refused(sealed_run: Path, site: dict, tmp_path: Path) -> None:
    swapped = tmp_path / "swapped"
    shutil.copytree(sealed_run, swapped)
    best, last = swapped / "checkpoints" / "best.ckpt", swapped / "checkpoints" / "last.ckpt"
    best.rename(swapped / "tmp.ckpt")
    last.rename(best)
    (swapped / "tmp.ckpt").rename(last)
    with pytest.raises(SecurityError, match="sealed as 'checkpoints/last.ckpt' of run .*, but is opened as "
                                            "'checkpoints/best.ckpt' .*renamed, swapped or moved"):
        run_verb("eval", [f"ckpt_path={best}", "crypto=aes", *site["refs"]], tmp_path / "e1")
    other = tmp_path / "other"  # the same files under another run's id: a file moved from another run
    shutil.copytree(sealed_run, other)
    (other / RUN_FILE).write_text(json.dumps({"run_id": "another-run"}))
    with pytest.raises(SecurityError, match="of run [0-9a-f]{32}, but is opened as 'checkpoints/best.ckpt' of run another-run"):
        run_verb("eval", [f"ckpt_path={other / 'checkpoints' / 'best.ckpt'}", "crypto=aes", *site["refs"]], tmp_path / "e2")
    loose = tmp_path / "loose.ckpt"  # taken out of its run directory
    shutil.copy(sealed_run / "checkpoints" / "best.ckpt", loose)
    with pytest.raises(SecurityError, match="is not inside a medsec run directory"):
        run_verb("eval", [f"ckpt_path={loose}", "crypto=aes", *site["refs"]], tmp_path / "e3")
    evaluated = run_verb("eval", [f"ckpt_path={sealed_run / 'checkpoints' / 'best.ckpt'}", "crypto=aes", *site["refs"]],
                         tmp_path / "e4")
    assert 0 <= evaluated["test/acc"] <= 1 and (tmp_path / "e4" / "metrics.json.enc").is_file()


def test_an_unsealed_checkpoint_is_refused_when_sealing_is_on(trained_run: Path, site: dict, tmp_path: Path) -> None:
    plain = trained_run / "checkpoints" / "best.ckpt"
    sealing = ["crypto=aes", "crypto.encrypt_checkpoints=true", *site["refs"]]
    with pytest.raises(SecurityError, match="best.ckpt is not sealed, but crypto.encrypt_checkpoints=true"):
        run_verb("eval", [f"ckpt_path={plain}", *sealing], tmp_path / "eval")
    with pytest.raises(SecurityError, match="best.ckpt is not sealed, but crypto.encrypt_checkpoints=true"):
        run_verb("train", [*TINY, f"ckpt_path={plain}", *sealing], tmp_path / "resume")


def test_swapped_patient_outputs_are_refused(site: dict, tmp_path: Path) -> None:
    stage = site["stage"]
    stage.encrypt_outputs = True
    writer = stage.output_writer(tmp_path / "run")
    a = writer.write("predictions/patient_A.nii.gz", b"label map of A")
    b = writer.write("predictions/patient_B.nii.gz", b"label map of B")
    assert stage.open(a, "output") == b"label map of A"
    a.rename(tmp_path / "t")
    b.rename(a)
    (tmp_path / "t").rename(b)
    with pytest.raises(SecurityError, match="sealed as 'predictions/patient_B.nii.gz.enc' .* opened as "
                                            "'predictions/patient_A.nii.gz.enc'"):
        stage.open(a, "output")
    with pytest.raises(SecurityError, match="patient_B.nii.gz.enc' of run .*renamed, swapped"):
        run_verb("encrypt", ["action=decrypt", f"input={a}", f"output={tmp_path / 'out'}", *site["refs"]], tmp_path / "d")
    assert not (tmp_path / "out").exists()


def test_loggers_that_cannot_be_sealed_are_refused(site: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="logger: TensorBoardLogger would keep per-run metrics in clear"):
        run_verb("train", [*TINY, "crypto=aes", "crypto.encrypt_outputs=true", "logger=tensorboard", *site["refs"]],
                 tmp_path / "run")


def test_decrypt_writes_a_new_private_file_and_never_follows_a_symlink(site: dict, tmp_path: Path) -> None:
    stage = site["stage"]
    stage.encrypt_outputs = True
    sealed = stage.output_writer(tmp_path / "run").write("predictions.csv", b"id,prob\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.csv"
    link.symlink_to(victim)
    run_verb("encrypt", ["action=decrypt", f"input={sealed}", f"output={link}", *site["refs"]], tmp_path / "d1")
    assert victim.read_text() == "keep me" and not link.is_symlink() and link.read_bytes() == b"id,prob\n"
    existing = tmp_path / "existing.csv"
    existing.write_text("old")
    os.chmod(existing, 0o644)
    run_verb("encrypt", ["action=decrypt", f"input={sealed}", f"output={existing}", *site["refs"]], tmp_path / "d2")
    assert oct(existing.stat().st_mode & 0o777) == "0o600" and existing.read_bytes() == b"id,prob\n"


def test_run_ids_are_shared_by_every_writer_of_a_run(tmp_path: Path) -> None:
    first = ensure_run_id(tmp_path)
    assert ensure_run_id(tmp_path) == first and len(first) == 32
    (tmp_path / RUN_FILE).write_text("{}")
    with pytest.raises(SecurityError, match="run.json is damaged"):
        ensure_run_id(tmp_path)
