"""Checkpoints are data: read them without unpickling objects, and build nothing from them that
the registry does not allow.

A checkpoint someone sends you must not run code. :func:`read_checkpoint` loads with
``torch.load(weights_only=True)`` (tensors and plain containers only), refuses an unsealed file
where sealing is on, and checks every config stored inside (the task's hyper-parameters and the
run information ``medsec train`` adds) before anything is instantiated: every ``_target_`` at every
depth must be registered (:mod:`medsec.core.registry`), interpolations are refused, and the
protections are rebuilt from its key *reference* fields, never instantiated as found.
"""
from __future__ import annotations

import inspect
import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medsec.core.registry import check_stored
from medsec.errors import ConfigError, SecurityError
from medsec.protections.aes import is_sealed
from medsec.utils.outputs import atomic_write, ensure_run_id

CHECKPOINT_KEY = "medsec"
"""The entry ``medsec train`` adds to every checkpoint: task class, data config, protections (key references)."""
HPARAM_KINDS = ("network", "optimizer", "scheduler")
STAGE_FIELDS = {
    "medsec.protections.AESStage": ("store_root", "store", "bits", "encrypt_checkpoints", "encrypt_outputs"),
    "medsec.protections.perceptual.PerceptualStage": ("block_size", "scramble", "rotate_flip", "negative_positive",
                                                 "channel_shuffle", "per_image"),
}
"""The stages a checkpoint may name, with the plain fields it may set (besides the key reference)."""
KEY_FIELDS = ("source", "file", "env", "passphrase_env")
_GLOBAL = re.compile(r"GLOBAL [\w.]+")


def _load(source: Path | io.BytesIO, where: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found is None:
            raise ConfigError(f"{where}: not a readable checkpoint ({str(err).splitlines()[0][:200]})") from None
        raise SecurityError(f"{where}: refused, it holds Python objects other than tensors and plain data "
                            f"({found.group(0)[:200]}); checkpoints are never unpickled") from None
    except Exception as err:
        raise ConfigError(f"{where}: not a readable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None


def read_checkpoint(path: str | Path, stage: Any = None, field: str = "ckpt_path", run_info: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path`` as plain data, checked.

    A sealed checkpoint needs ``stage`` (the AES stage with its key); a plain one is refused when
    ``stage.encrypt_checkpoints`` is set. ``run_info``: require the entry ``medsec train`` writes.
    """
    path = Path(path).expanduser()
    where = f"{field}: {path}"
    if not path.is_file():
        raise ConfigError(f"{field}: checkpoint not found: {path}")
    if is_sealed(path):
        if stage is None or not hasattr(stage, "open"):
            raise ConfigError(f"{where} is encrypted; add protect=[aes] (or crypto=aes) with the key it was sealed with")
        source: Path | io.BytesIO = io.BytesIO(stage.open(path, "checkpoint"))
    elif getattr(stage, "encrypt_checkpoints", False):
        raise SecurityError(f"{where} is not sealed, but crypto.encrypt_checkpoints=true: an unsealed checkpoint "
                            "is refused (it could have been put in place of the sealed one)")
    else:
        source = path
    payload = _load(source, where)
    if not isinstance(payload, dict):
        raise ConfigError(f"{where}: not a checkpoint (a {type(payload).__name__}, not a mapping)")
    check_payload(payload, where, run_info)
    return payload


def check_payload(payload: Mapping[str, Any], where: str, run_info: bool = True) -> None:
    """Check the configs stored in a loaded checkpoint (see the module doc)."""
    hparams = payload.get("hyper_parameters", {})
    if not isinstance(hparams, Mapping):
        raise ConfigError(f"{where}: hyper_parameters is not a mapping")
    check_stored(hparams, where, HPARAM_KINDS, "hyper_parameters")
    if not run_info:
        return
    info = payload.get(CHECKPOINT_KEY)
    if not isinstance(info, Mapping):
        raise ConfigError(f"{where} was not written by `medsec train` (no '{CHECKPOINT_KEY}' entry)")
    check_stored({"task_target": {"_target_": info.get("task_target")}}, where, ("task",), CHECKPOINT_KEY)
    if not isinstance(info.get("data"), Mapping):
        raise ConfigError(f"{where}: {CHECKPOINT_KEY}.data is not a mapping")
    check_stored(info["data"], where, ("data",), f"{CHECKPOINT_KEY}.data")
    if not isinstance(info.get("protect", []), list):
        raise ConfigError(f"{where}: {CHECKPOINT_KEY}.protect is not a list")
    check_stored(info.get("protect", []), where, ("protection",), f"{CHECKPOINT_KEY}.protect")


def rebuild_protection(stored: Mapping[str, Any], where: str) -> Any:
    """A protection a training run read its data through, built from the key reference and plain
    fields its checkpoint stored (never instantiated from the stored config)."""
    target = stored.get("_target_")
    if target not in STAGE_FIELDS:
        raise ConfigError(f"{where}: protect: _target_ {str(target)[:120]!r} is not a protection a checkpoint may name")
    key = stored.get("key")
    if not isinstance(key, Mapping) or set(key) - set(KEY_FIELDS) or \
            not all(value is None or isinstance(value, str) for value in key.values()):
        raise ConfigError(f"{where}: protect: key must be a key reference ({', '.join(KEY_FIELDS)}: strings)")
    fields = {name: stored[name] for name in STAGE_FIELDS[target] if name in stored}
    for name, value in fields.items():
        if value is not None and not isinstance(value, (str, int, bool)):
            raise ConfigError(f"{where}: protect: {name} must be a plain value")
    protection = get_class(target)(key=dict(key), **fields)
    protection.config = {"_target_": target, "key": dict(key), **fields}
    return protection


def build_task(payload: Mapping[str, Any], where: str, expect: type | None = None) -> Any:
    """The task class named in a checked checkpoint, built from its hyper-parameters, with its
    weights (in evaluation mode); ``expect``: the class it must be."""
    cls = get_class(payload[CHECKPOINT_KEY]["task_target"])
    if expect is not None and not issubclass(cls, expect):
        raise ConfigError(f"{where} holds a {cls.__name__}, not a {expect.__name__}")
    hparams = dict(payload.get("hyper_parameters", {}))
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hparams = {k: v for k, v in hparams.items() if k in parameters}
    try:
        task = cls(**hparams)
        task.on_load_checkpoint(dict(payload))
        task.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(f"{where}: its weights or hyper-parameters do not fit {cls.__name__} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    return task.eval()


class CheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for every medsec trainer: atomic writes, sealed with AES-GCM when
    ``stage.encrypt_checkpoints`` (bound to the file's place in ``run_dir``), and reads through
    :func:`read_checkpoint` (so resuming and ``trainer.test(ckpt_path=...)`` never unpickle)."""

    def __init__(self, stage: Any = None, run_dir: str | Path | None = None) -> None:
        self.stage = stage
        self.sealing = bool(getattr(stage, "encrypt_checkpoints", False))
        if self.sealing:
            if run_dir is None:
                raise ConfigError("sealed checkpoints need the run directory they belong to")
            ensure_run_id(run_dir)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        if self.sealing:
            self.stage.seal_to(path, buffer.getvalue(), "checkpoint")
        else:
            atomic_write(path, buffer.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, self.stage)
