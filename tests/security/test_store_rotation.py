"""Crash safety of the encrypted store: writing and key rotation with a fault at every step.

Every filesystem step of :mod:`medsec.protections.store` announces itself to ``store.step_hook`` first.
For each step, the tests (a) raise an exception there and (b) kill the process there (a forked child
calls ``os._exit(137)``). Afterwards the store must open with exactly one of the old key (a fault
before the switch of ``CURRENT``) or the new key (after it), every record must decrypt to the
original, nothing temporary may be left once the store was opened, and a second rotation must work.
"""
from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medsec.data.sources.base import SPLITS
from medsec.errors import ConfigError, DataError, SecurityError
from medsec.protections import store as store_module
from medsec.protections.keys import KeyRef, SecretKey, write_key_file
from medsec.protections.store import (
    CREATE_STEPS,
    CURRENT,
    MANIFEST,
    MIGRATE_STEPS,
    RECORDS,
    ROTATE_STEPS,
    STORE_FILES,
    EncryptedSource,
    RecordStore,
    live_dir,
    rotate_key,
    write_store,
)
from tests.conftest import run_verb

KILLED = 137
FORK = multiprocessing.get_context("fork")
DESCRIPTION = {"class_names": ["a", "b"], "multilabel": False, "spatial_dims": 2, "train_class_counts": [2, 1],
               "info": {"what": "fault injection"}}


def original_records() -> dict[str, list[dict]]:
    rng = np.random.default_rng(7)
    sizes = {"train": 3, "val": 2, "test": 1}
    return {split: [{"id": f"{split}-{i}", "image": rng.integers(0, 255, (1, 5, 4), dtype=np.uint8),
                     "mask": rng.random((1, 5, 4)).astype(np.float32), "label": i % 2} for i in range(n)]
            for split, n in sizes.items()}


RECORDS_IN = original_records()


def new_key(tmp_path: Path, name: str) -> KeyRef:
    return KeyRef(source="file", file=str(write_key_file(tmp_path / "keys" / f"{name}.key", SecretKey.generate())))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, KeyRef]:
    return {name: new_key(tmp_path, name) for name in ("old", "new", "third")}


def make_store(path: Path, key_ref: KeyRef, flat: bool = False) -> Path:
    write_store(path, RECORDS_IN, dataset_id="fault-test", description=DESCRIPTION, key_ref=key_ref)
    if flat:  # the layout of stores written before versions: the three files directly in the store
        for name in STORE_FILES:
            (path / "v1" / name).rename(path / name)
        (path / "v1").rmdir()
        (path / CURRENT).unlink()
    return path


def assert_intact(path: Path, key_ref: KeyRef) -> RecordStore:
    """The store opens with ``key_ref``, every record equals the original, nothing else is left."""
    store = RecordStore(path, key_ref)
    assert store.description == DESCRIPTION
    for split in SPLITS:
        assert len(store.records[split]) == len(RECORDS_IN[split])
        for index, expected in enumerate(RECORDS_IN[split]):
            record = store.read(split, index)
            assert record["id"] == expected["id"] and record["label"] == expected["label"]
            assert np.array_equal(record["image"], expected["image"]) and record["image"].dtype == np.uint8
            assert np.array_equal(record["mask"], expected["mask"]) and record["mask"].dtype == np.float32
    expected = sorted(STORE_FILES) if store.files == path else [CURRENT, store.files.name]  # flat, or versions
    assert sorted(p.name for p in path.iterdir()) == expected  # opening cleaned up
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]
    return store


def opens_only_with(path: Path, right: KeyRef, wrong: KeyRef) -> None:
    """Exactly one of the two keys opens the store: ``right``."""
    assert_intact(path, right)
    with pytest.raises(SecurityError, match="wrong key"):
        RecordStore(path, wrong)


def hook_at(step: str, action: Callable[[], None]) -> Callable[[str], None]:
    """A step hook that runs ``action`` at the first announcement of ``step``."""
    seen = []

    def hook(name: str) -> None:
        if name == step and not seen:
            seen.append(name)
            action()
    return hook


def kill() -> None:
    os._exit(KILLED)


def in_child(step: str, work: Callable[[], object]) -> int:
    """Run ``work`` in a forked child that is killed at ``step``; returns the child's exit code."""
    def target() -> None:
        store_module.step_hook = hook_at(step, kill)
        work()
    child = FORK.Process(target=target)
    child.start()
    child.join(120)
    return child.exitcode


def after_switch(steps: tuple[str, ...], step: str) -> bool:
    return steps.index(step) > steps.index("switch-current")


ROTATION_CASES = [("versioned", step) for step in ROTATE_STEPS] + [("flat", step) for step in MIGRATE_STEPS]


def test_every_step_is_announced_in_order(tmp_path: Path, keys: dict[str, KeyRef], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault tests below cover every step because the steps are exactly these lists."""
    steps: list[str] = []
    monkeypatch.setattr(store_module, "step_hook", steps.append)
    make_store(tmp_path / "s", keys["old"])
    assert tuple(steps) == CREATE_STEPS
    steps.clear()
    rotate_key(tmp_path / "s", keys["old"], keys["new"])
    assert tuple(steps) == ROTATE_STEPS
    monkeypatch.setattr(store_module, "step_hook", lambda step: None)
    make_store(tmp_path / "flat", keys["old"], flat=True)
    monkeypatch.setattr(store_module, "step_hook", steps.append)
    steps.clear()
    rotate_key(tmp_path / "flat", keys["old"], keys["new"])
    assert tuple(steps) == MIGRATE_STEPS
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [CURRENT, "v1"]


@pytest.mark.parametrize("error", [OSError, RuntimeError])
@pytest.mark.parametrize(("layout", "step"), ROTATION_CASES)
def test_rotation_survives_an_exception_at_every_step(layout: str, step: str, error: type, tmp_path: Path,
                                                       keys: dict[str, KeyRef], monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_store(tmp_path / "store", keys["old"], flat=layout == "flat")
    steps = MIGRATE_STEPS if layout == "flat" else ROTATE_STEPS

    def fail() -> None:
        raise error(errno.EIO, f"injected fault at {step}") if error is OSError else error(f"injected fault at {step}")

    monkeypatch.setattr(store_module, "step_hook", hook_at(step, fail))
    committed = after_switch(steps, step)
    if committed and error is OSError:  # the new version is live: clean-up errors only warn
        rotate_key(path, keys["old"], keys["new"])
    else:
        with pytest.raises(error, match=f"injected fault at {step}"):
            rotate_key(path, keys["old"], keys["new"])
    monkeypatch.setattr(store_module, "step_hook", lambda name: None)
    live, dead = (keys["new"], keys["old"]) if committed else (keys["old"], keys["new"])
    opens_only_with(path, live, dead)
    rotate_key(path, live, keys["third"])  # and the store rotates again
    opens_only_with(path, keys["third"], live)


@pytest.mark.parametrize(("layout", "step"), ROTATION_CASES)
def test_rotation_survives_a_kill_at_every_step(layout: str, step: str, tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"], flat=layout == "flat")
    steps = MIGRATE_STEPS if layout == "flat" else ROTATE_STEPS
    assert in_child(step, lambda: rotate_key(path, keys["old"], keys["new"])) == KILLED
    live, dead = (keys["new"], keys["old"]) if after_switch(steps, step) else (keys["old"], keys["new"])
    opens_only_with(path, live, dead)
    rotate_key(path, live, keys["third"])
    opens_only_with(path, keys["third"], live)


@pytest.mark.parametrize("step", CREATE_STEPS)
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_new_store_appears_whole_or_not_at_all(step: str, fault: str, tmp_path: Path, keys: dict[str, KeyRef],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stores" / "new"
    if fault == "kill":
        assert in_child(step, lambda: make_store(path, keys["old"])) == KILLED
    else:
        def fail() -> None:
            raise OSError(errno.ENOSPC, f"injected fault at {step}")
        monkeypatch.setattr(store_module, "step_hook", hook_at(step, fail))
        with pytest.raises(OSError, match=f"injected fault at {step}"):
            make_store(path, keys["old"])
        monkeypatch.setattr(store_module, "step_hook", lambda name: None)
        assert [p.name for p in path.parent.iterdir()] == (["new"] if path.exists() else [])  # no temporary left
    if CREATE_STEPS.index(step) > CREATE_STEPS.index("rename-store"):
        assert_intact(path, keys["old"])
    else:
        assert not path.exists()
        with pytest.raises(DataError, match="encrypted store not found"):
            RecordStore(path, keys["old"])
        make_store(path, keys["old"])  # a new attempt works, and removes what the killed writer left
        assert sorted(p.name for p in path.parent.iterdir()) == ["new"]
        assert_intact(path, keys["old"])
    rotate_key(path, keys["old"], keys["new"])
    opens_only_with(path, keys["new"], keys["old"])


@pytest.mark.parametrize("step", ["recover-remove", "recover-sync"])
def test_a_kill_while_cleaning_up_leaves_the_store_readable(step: str, tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"])
    assert in_child("sync-store", lambda: rotate_key(path, keys["old"], keys["new"])) == KILLED  # v2 in place, not live
    (path / ".tmp-v3-1").mkdir()  # and a temporary directory, as a killed rotation leaves one
    assert in_child(step, lambda: RecordStore(path, keys["old"])) == KILLED
    opens_only_with(path, keys["old"], keys["new"])
    rotate_key(path, keys["old"], keys["new"])
    opens_only_with(path, keys["new"], keys["old"])


def test_overwrite_is_a_new_version_too(tmp_path: Path, keys: dict[str, KeyRef], monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_store(tmp_path / "store", keys["old"])
    monkeypatch.setattr(store_module, "step_hook", hook_at("switch-current", kill_by_exception))
    with pytest.raises(KeyboardInterrupt):
        write_store(path, {"train": [], "val": [], "test": []}, dataset_id="other", description={},
                    key_ref=keys["new"], overwrite=True)
    monkeypatch.setattr(store_module, "step_hook", lambda name: None)
    opens_only_with(path, keys["old"], keys["new"])
    write_store(path, {"train": [], "val": [], "test": []}, dataset_id="other", description={}, key_ref=keys["new"],
                overwrite=True)
    assert RecordStore(path, keys["new"]).dataset_id == "other"
    assert sorted(p.name for p in path.iterdir()) == [CURRENT, "v2"]


def kill_by_exception() -> None:
    raise KeyboardInterrupt


def test_a_damaged_record_stops_the_rotation_and_keeps_the_old_store(tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"])
    store = RecordStore(path, keys["old"])
    _, offset, length, _ = store.records["val"][1]
    data = bytearray((store.files / RECORDS).read_bytes())
    data[offset + length // 2] ^= 1
    (store.files / RECORDS).write_bytes(bytes(data))
    with pytest.raises(SecurityError, match=r"record 1 of split 'val' .* failed authentication"):
        rotate_key(path, keys["old"], keys["new"])
    assert sorted(p.name for p in path.iterdir()) == [CURRENT, "v1"]
    assert RecordStore(path, keys["old"]).read("val", 0)["id"] == "val-0"


def test_a_rotation_in_progress_is_left_alone(tmp_path: Path, keys: dict[str, KeyRef], monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening does not clean up while the lock is held (a rotation is under way), and a second
    writer is refused rather than interleaved."""
    path = make_store(tmp_path / "store", keys["old"])
    assert in_child("switch-current", lambda: rotate_key(path, keys["old"], keys["new"])) == KILLED
    leftovers = sorted(p.name for p in path.iterdir())
    assert leftovers[0].startswith(".tmp-CURRENT-") and leftovers[1:] == [CURRENT, "v1", "v2"]
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the rotation holds it
        assert RecordStore(path, keys["old"]).read("train", 0)["id"] == "train-0"
        assert sorted(p.name for p in path.iterdir()) == leftovers  # nothing touched
        monkeypatch.setattr(store_module, "LOCK_WAIT_S", 0.2)
        with pytest.raises(ConfigError, match=f"store {path} is locked: another process is writing or rotating it"):
            rotate_key(path, keys["old"], keys["new"])
        with pytest.raises(ConfigError, match="is locked"):
            write_store(path, RECORDS_IN, dataset_id="x", description={}, key_ref=keys["new"], overwrite=True)
    finally:
        os.close(fd)
    opens_only_with(path, keys["old"], keys["new"])


def test_a_reader_opened_before_a_rotation_gets_a_clear_error(tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"])
    reading, stale = RecordStore(path, keys["old"]), RecordStore(path, keys["old"])
    assert reading.read("train", 0)["id"] == "train-0"  # its records file is open
    rotate_key(path, keys["old"], keys["new"])
    assert reading.read("train", 2)["id"] == "train-2"  # an open file outlives its removal
    with pytest.raises(DataError, match=f"store {path} changed while it was open .*open it again"):
        stale.read("train", 0)
    reading.close()


def test_flat_stores_are_read_verified_and_rotated(tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"], flat=True)
    store = RecordStore(path, keys["old"])
    assert store.files == path == live_dir(path) and store.verify_digests() == []
    data = EncryptedSource(path, keys["old"]).load()
    assert data.class_names == ["a", "b"] and len(data.splits["train"]) == 3
    (path / "v1").mkdir()  # an uncommitted first rotation: not live, removed on opening
    (path / "v1" / MANIFEST).write_text("{}")
    assert assert_intact(path, keys["old"]).files == path
    rotate_key(path, keys["old"], keys["new"])
    assert sorted(p.name for p in path.iterdir()) == [CURRENT, "v1"] and live_dir(path) == path / "v1"
    opens_only_with(path, keys["new"], keys["old"])


def test_damaged_current_is_named_and_nothing_is_removed(tmp_path: Path, keys: dict[str, KeyRef]) -> None:
    path = make_store(tmp_path / "store", keys["old"])
    rotate_key(path, keys["old"], keys["new"])
    (path / "v1").mkdir()
    for content in (b"v9\n", b"../etc\n", b"\xff" * 100, b""):
        (path / CURRENT).write_bytes(content)
        error = "is incomplete .*v9/manifest.json" if content == b"v9\n" else f"store {path}: CURRENT is damaged"
        with pytest.raises(DataError, match=error):
            RecordStore(path, keys["new"])
        assert sorted(p.name for p in path.iterdir()) == [CURRENT, "v1", "v2"]


def test_verb_rotation_keeps_the_old_key_after_a_failed_switch(tmp_path: Path, keys: dict[str, KeyRef],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`medsec encrypt action=rotate` goes through the same steps."""
    path = make_store(tmp_path / "store", keys["old"], flat=True)
    overrides = ["action=rotate", f"crypto.store={path}", f"crypto.key.file={keys['old'].file}",
                 f"new_key.file={keys['new'].file}"]

    def fail() -> None:
        raise OSError(errno.EIO, "injected fault at switch-current")

    monkeypatch.setattr(store_module, "step_hook", hook_at("switch-current", fail))
    with pytest.raises(OSError, match="injected fault"):
        run_verb("encrypt", overrides, tmp_path / "r1")
    monkeypatch.setattr(store_module, "step_hook", lambda name: None)
    opens_only_with(path, keys["old"], keys["new"])
    summary = run_verb("encrypt", overrides, tmp_path / "r2")
    assert summary["key_id"] == keys["new"].load().key_id and summary["records"] == {"train": 3, "val": 2, "test": 1}
    assert summary["bytes"] == (path / "v1" / RECORDS).stat().st_size
    report = json.loads((tmp_path / "r2" / "encrypt_report.json").read_text())
    assert report["action"] == "rotate"
    verified = run_verb("encrypt", ["action=verify", f"crypto.store={path}", f"crypto.key.file={keys['new'].file}"],
                        tmp_path / "v")
    assert verified["records"] == summary["records"]


def test_any_failing_rename_leaves_exactly_one_whole_store(tmp_path: Path, keys: dict[str, KeyRef],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent of the step names: the k-th rename of a replacement fails, for every k. (The old
    swap renamed the store aside, then the new one in: a failing second rename left no store.)"""
    real = {"rename": os.rename, "replace": os.replace}
    k = 0
    while True:
        k += 1
        path = make_store(tmp_path / f"store{k}", keys["old"])
        calls = []

        def failing(name: str, calls: list = calls, k: int = k) -> Callable[..., None]:
            def call(*args, **kwargs) -> None:
                calls.append(name)
                if len(calls) == k:
                    raise OSError(errno.EIO, f"injected failure of rename {k}")
                return real[name](*args, **kwargs)
            return call

        monkeypatch.setattr(os, "rename", failing("rename"))
        monkeypatch.setattr(os, "replace", failing("replace"))
        try:
            write_store(path, RECORDS_IN, dataset_id="fault-test", description=DESCRIPTION, key_ref=keys["new"],
                        overwrite=True)
            failed = False
        except OSError as err:
            assert f"injected failure of rename {k}" in str(err)
            failed = True
        finally:
            monkeypatch.setattr(os, "rename", real["rename"])
            monkeypatch.setattr(os, "replace", real["replace"])
        if len(calls) < k:  # no rename left to fail: every one was tried
            break
        try:
            RecordStore(path, keys["new"])
            live, dead = keys["new"], keys["old"]
        except SecurityError:
            assert failed, "the replacement reported success but the old key is still live"
            live, dead = keys["old"], keys["new"]
        opens_only_with(path, live, dead)
    assert k > 3  # the version, CURRENT and retiring the old version were each made to fail
