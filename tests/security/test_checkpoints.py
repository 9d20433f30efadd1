"""A checkpoint is data: loading one never runs code, and nothing in it is built unless the
registry allows it. Each attack is a crafted checkpoint built here; every refusal also checks that
the attack's side effect (a marker file) did not happen."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from medsec.core.checkpoint import read_checkpoint
from medsec.core.registry import check_targets, registered
from medsec.errors import ConfigError, MedsecError, SecurityError
from tests.conftest import TINY, medsec_cli, run_verb


class Gadget:
    """Runs ``touch marker`` when unpickled (a classic ``__reduce__`` payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tamper(source: Path, target: Path, edit) -> Path:
    """A copy of the checkpoint ``source`` with ``edit(payload)`` applied."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


def pickle_chain(marker: Path) -> dict:
    """A Hydra chain that unpickles ``Gadget`` when instantiated, under a harmless outer target."""
    return {"_target_": "builtins.dict",
            "payload": {"_target_": "torch.load", "weights_only": False,
                        "f": {"_target_": "io.BytesIO", "_args_": [pickle.dumps(Gadget(marker))]}}}


@pytest.fixture
def best(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "best.ckpt"


def test_pickle_gadget_in_a_checkpoint_is_refused_by_every_loader(best: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tamper(best, tmp_path / "evil.ckpt", lambda p: p["medsec"].__setitem__("note", Gadget(marker)))
    with pytest.raises(SecurityError, match=r"ckpt_path: .*evil.ckpt: refused, it holds Python objects other than "
                                            r"tensors and plain data \(GLOBAL posix.system\)"):
        run_verb("eval", [f"ckpt_path={evil}"], tmp_path / "eval")
    with pytest.raises(SecurityError, match="model.init_from: .*evil.ckpt: refused"):
        run_verb("train", [*TINY, f"model.init_from={evil}"], tmp_path / "init")
    with pytest.raises(SecurityError, match="ckpt_path: .*evil.ckpt: refused"):  # resuming goes through CheckpointIO
        run_verb("train", [*TINY, f"ckpt_path={evil}"], tmp_path / "resume")
    assert not marker.exists()


@pytest.mark.parametrize("place", ["model.net", "data", "data.source", "protect", "optimizer"])
def test_a_hydra_chain_stored_in_a_checkpoint_is_never_instantiated(best: Path, tmp_path: Path, place: str) -> None:
    marker = tmp_path / "pwned"

    def edit(payload: dict) -> None:
        info, hparams = payload["medsec"], payload["hyper_parameters"]
        if place == "model.net":
            hparams["model"]["net"]["extra"] = pickle_chain(marker)
        elif place == "optimizer":
            hparams["optimizer"] = pickle_chain(marker)
        elif place == "data":
            info["data"] = pickle_chain(marker)
        elif place == "data.source":
            info["data"]["source"]["seed"] = pickle_chain(marker)
        else:
            info["protect"] = [pickle_chain(marker)]

    evil = tamper(best, tmp_path / "evil.ckpt", edit)
    assert isinstance(torch.load(evil, weights_only=True), dict)  # the file itself is plain data
    with pytest.raises(ConfigError, match=r"evil.ckpt: (hyper_parameters|medsec)\.[\w.\[\]]*_target_ = '(builtins.dict|torch.load|io.BytesIO)' is not a registered"):
        run_verb("eval", [f"ckpt_path={evil}"], tmp_path / "eval")
    assert not marker.exists()


def test_the_task_class_must_be_registered(best: Path, tmp_path: Path) -> None:
    evil = tamper(best, tmp_path / "evil.ckpt", lambda p: p["medsec"].__setitem__("task_target", "subprocess.Popen"))
    with pytest.raises(ConfigError, match=r"evil.ckpt: medsec.task_target._target_ = 'subprocess.Popen' is not a registered task"):
        read_checkpoint(evil)


def test_interpolations_in_a_checkpoint_are_refused(best: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDSEC_KEY", "00" * 31 + "01")
    evil = tamper(best, tmp_path / "evil.ckpt",
                  lambda p: p["medsec"]["data"]["source"].__setitem__("_target_", "${oc.env:MEDSEC_KEY}"))
    with pytest.raises(ConfigError, match="evil.ckpt: medsec.data.source._target_ holds an interpolation") as err:
        read_checkpoint(evil)
    assert "00" * 8 not in str(err.value)


@pytest.mark.slow
def test_the_command_line_answers_a_gadget_with_one_line_and_exit_2(best: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tamper(best, tmp_path / "evil.ckpt", lambda p: p.__setitem__("optimizer_states", [Gadget(marker)]))
    result = medsec_cli("eval", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "refused, it holds Python objects" in output and "Traceback" not in output
    assert not marker.exists()


def test_registry_checks_every_depth() -> None:
    allowed = {"_target_": "medsec.data.MedicalDataModule", "source": {"_target_": "medsec.data.sources.synthetic.SyntheticSource"}}
    check_targets(allowed, "data", ("data",))
    nested = {"_target_": "medsec.data.MedicalDataModule", "x": [{"y": {"_target_": "os.system"}}]}
    with pytest.raises(ConfigError, match=r"data: x\[0\].y._target_ = 'os.system' is not a registered data target"):
        check_targets(nested, "data", ("data",))
    with pytest.raises(ConfigError, match="is not a registered network target"):  # right name, wrong kind
        check_targets({"_target_": "medsec.data.MedicalDataModule"}, "model.net", ("network",))


def test_every_config_target_is_registered_and_importable() -> None:
    from hydra.utils import get_object

    from medsec.utils.config import CONFIG_DIR

    found = {line.split("_target_:", 1)[1].strip() for path in CONFIG_DIR.rglob("*.yaml")
             for line in path.read_text().splitlines() if "_target_:" in line and not line.lstrip().startswith("#")}
    assert found and found <= registered(), sorted(found - registered())
    for target in sorted(registered()):
        assert get_object(target) is not None, target


def test_a_state_dict_for_init_from_still_loads(best: Path, tmp_path: Path) -> None:
    state = tmp_path / "weights.pt"
    torch.save(torch.load(best, weights_only=True)["state_dict"], state)
    assert "net.head.weight" in "".join(read_checkpoint(state, field="model.init_from", run_info=False))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MedsecError, match="garbage.ckpt: not a readable checkpoint"):
        read_checkpoint(garbage)
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    (tmp_path / "list.ckpt").write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match="not a checkpoint \\(a list, not a mapping\\)"):
        read_checkpoint(tmp_path / "list.ckpt")
