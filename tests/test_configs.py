"""Every option of every config group composes and builds what it configures (data modules and a
batch of each, tasks with their models, trainers, callbacks, loggers, protections, attacks,
ciphers, the sweeper), and every experiment builds its data module, task and trainer: on tiny fake
copies of the real data sets (tests/data/fakes.py), so nothing here needs ../shared/data."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medsec.analysis.attacks import adapter_for, build_attack
from medsec.analysis.attacks.evaluate import parse_eps
from medsec.api import COMMANDS
from medsec.core.contracts import Protections
from medsec.core.run import Run
from medsec.data.datamodule import build_datamodule
from medsec.federated.federation import check
from medsec.federated.server import STRATEGIES, base_strategy, build_strategy
from medsec.federated.sites import num_sites
from medsec.protections import SecretKey
from medsec.protections.keys import write_key_file
from medsec.utils.config import CONFIG_DIR, compose_config, default_data_dir
from tests.data.fakes import make_class_folders, write_data_dir, write_image_masks

SMALL = ["data.source.num_samples=[16,8,8]", "data.source.image_size=32", "data.batch_size=8",
         "data.num_workers=0"]
"""A tiny synthetic data set for the groups that do not choose the data."""
NOT_BUILT = {
    "experiment": "has its own test below",
    "hydra": "Hydra's own settings (checked in test_paths_and_run_directory)",
    "paths": "plain paths (checked in test_paths_and_run_directory)",
    "local": "the user's own overrides (none are committed)",
}
NEEDS_GPU = "needs a CUDA GPU (accelerator: gpu)"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def compose(command: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    return compose_config(command, overrides, output_dir=tmp_path / "run")


def class_name(obj: Any) -> str:
    return type(obj).__qualname__


def last(target: str) -> str:
    """The class a ``_target_`` names, without its module (configs name public re-exports)."""
    return target.rsplit(".", 1)[1]


def targets(section: DictConfig | None) -> set[str]:
    """The classes the entries of a ``name: {_target_: ...}`` group name (null entries skipped)."""
    entries = (section or {}).values()
    return {last(e._target_) for e in entries if isinstance(e, DictConfig) and "_target_" in e}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake PneumoniaMNIST, BreastMNIST, NIH sample and MSD hippocampus under one ``paths.data_dir``."""
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of PNG, JPEG, DICOM and NIfTI files for ``data=folder``."""
    return make_class_folders(tmp_path_factory.mktemp("folder"))


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file and a store folder where the protection configs look for them by default."""
    key_file = write_key_file(tmp_path / "keys" / "test.key", SecretKey.generate())
    monkeypatch.setenv("MEDSEC_KEY_FILE", str(key_file))
    monkeypatch.setenv("MEDSEC_STORE_DIR", str(tmp_path / "stores"))
    return key_file


# ---- one builder per group: compose the option, build its object(s), check what they are ----------
DATA_SIZES = {
    "synthetic": ["data.source.num_samples=[16,8,8]", "data.source.image_size=16"],
    "synthetic_seg": ["data.source.num_samples=[16,8,8]", "data.source.image_size=16"],
    "chestxray14": ["data.image_size=32"],
    "synthetic_det": ["data.source.num_samples=[16,8,8]", "data.source.image_size=32"],
    "nih_boxes": ["data.image_size=32"],
    "decathlon_boxes": ["data.image_size=[16,16,16]"],
}


def build_data(option: str, tmp_path: Path, data_dir: Path, folder: Path, **_: Any) -> None:
    extra = DATA_SIZES.get(option, [])
    if option == "folder":
        extra = [f"data.source.root={folder}", "data.image_size=32"]
    if option == "coco":
        from tests.data.test_detection_data import write_coco

        root = write_coco(tmp_path / "coco", [{"image_id": i, "category_id": 7, "bbox": [4, 2, 10, 6]} for i in range(4)],
                          images=8)
        extra = [f"data.source.root={root}"]
    if option == "image_masks":
        pairs = write_image_masks(tmp_path / "pairs")
        extra = [f"data.source.root={pairs.parent}", f"data.source.csv={pairs.name}", "data.source.class_names=[lesion]"]
    cfg = compose("train", [f"data={option}", f"paths.data_dir={data_dir}", "data.num_workers=0",
                            "data.batch_size=4", *extra], tmp_path)
    datamodule = build_datamodule(cfg.data)
    info = datamodule.task_info()
    assert info["num_classes"] == len(info["class_names"]) >= 1
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    images = batch["image"]
    assert images.ndim == info["spatial_dims"] + 2 and images.shape[1] == info["in_channels"]
    assert 1 <= len(images) <= 4 and images.dtype == torch.float32 and torch.isfinite(images).all()
    target = batch.get("label", batch.get("mask"))
    assert target is not None and len(target) == len(images)


MODEL_TASK = {
    # conf/model option -> the task it is built through (the same as in the experiments)
    "small_cnn": "classification", "resnet18": "classification", "resnet50": "classification",
    "densenet121": "classification", "he_cnn": "classification", "he_cnn_deep": "classification",
    "unet2d": "segmentation", "unet3d": "segmentation", "segresnet": "segmentation",
    "dynunet": "segmentation",
    "dae": "denoising", "dncnn": "denoising", "monai_autoencoder": "denoising",
    "hyperprior_codec": "compression",
    "deepkeygen": "deepkeygen", "encipher_gan": "encipher_gan",
    "fasterrcnn_resnet18": "detection", "fasterrcnn_mobilenet": "detection", "fasterrcnn_resnet50": "detection",
    "retinanet": "detection", "retinanet_monai": "detection",
}
TASK_DATA = {"segmentation": ["data=synthetic_seg"], "detection": ["data=synthetic_det"]}


def build_model(option: str, tmp_path: Path, **_: Any) -> None:
    assert option in MODEL_TASK, f"conf/model/{option}.yaml: add the task it is built through to MODEL_TASK"
    task_name = MODEL_TASK[option]
    size = ["data.source.image_size=28"] if option.startswith("he_cnn") else []  # built for its image size
    cfg = compose("train", [f"model={option}", f"task={task_name}", *TASK_DATA.get(task_name, []), *SMALL,
                            *size], tmp_path)
    run = Run.build(cfg)
    task = run.task
    assert class_name(task) == last(cfg.task._target_)
    assert sum(p.numel() for p in task.parameters()) > 0
    assert run.monitor[0] == task.monitor and task.monitor.startswith("val/")
    if task_name == "classification":  # the head has one output per class of the data
        images = torch.rand(2, 1, *[cfg.data.source.image_size] * 2)
        with torch.no_grad():
            logits = task.eval()(images)
        assert logits.shape == (2, run.datamodule.num_classes) and torch.isfinite(logits).all()


def build_task(option: str, tmp_path: Path, **_: Any) -> None:
    model = next(m for m, t in MODEL_TASK.items() if t == option)  # the first model built through it
    cfg = compose("train", [f"task={option}", f"model={model}", *TASK_DATA.get(option, []), *SMALL], tmp_path)
    task = Run.build(cfg).task
    assert class_name(task) == last(cfg.task._target_)
    assert task.hparams.optimizer["_target_"] == cfg.task.optimizer._target_


def build_trainer_parts(group: str) -> Callable[..., None]:
    """trainer / callbacks / logger / debug: the run's trainer with its callbacks and loggers."""

    def build(option: str, tmp_path: Path, **_: Any) -> None:
        cfg = compose("train", [f"{group}={option}", *SMALL], tmp_path)
        if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
            pytest.skip(NEEDS_GPU)
        run = Run.build(cfg)
        callbacks = run.callbacks()
        trainer = run.trainer(callbacks)
        assert {class_name(c) for c in callbacks} >= targets(cfg.callbacks)
        monitored = [c for c in callbacks if hasattr(c, "monitor") and hasattr(c, "mode")]
        assert all(c.monitor == run.monitor[0] for c in monitored), [(c, c.monitor) for c in monitored]
        loggers = targets(cfg.logger)
        if trainer.fast_dev_run and loggers:  # Lightning swaps the loggers for one that records nothing
            loggers = {"DummyLogger"}
        assert {class_name(lg) for lg in trainer.loggers} == loggers
        assert trainer.max_epochs == (1 if trainer.fast_dev_run else cfg.trainer.max_epochs)
        if group == "trainer":
            assert trainer.num_devices == cfg.trainer.devices and trainer.strategy is not None
        if group == "debug":  # every trainer setting of the option reached the trainer
            own = OmegaConf.load(CONFIG_DIR / "debug" / f"{option}.yaml").get("trainer", {})
            assert own and all(getattr(trainer, key) == value for key, value in own.items()), dict(own)

    return build


def build_protection(group: str) -> Callable[..., None]:
    """protect / crypto / defense (the last two aliases of the first): the protection objects."""
    select = {"protect": "protect=[{}]", "crypto": "crypto={}", "defense": "+defense={}"}[group]

    def build(option: str, tmp_path: Path, keys: Path, **_: Any) -> None:
        cfg = compose("train", [select.format(option), *SMALL], tmp_path)
        protections = Protections.from_config(cfg.get("protect"), cfg.get("crypto"))
        assert len(protections) == 1
        configured = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")._target_
        assert class_name(protections[0]) == last(configured)
        key = getattr(protections[0], "key", None)
        if key is not None:  # a key reference, resolved to the key file the environment names
            assert Path(str(key.file)).expanduser() == keys

    return build


def build_attack_option(option: str, tmp_path: Path, **_: Any) -> None:
    cfg = compose("attack", [f"attack={option}", "ckpt_path=unused.ckpt"], tmp_path)
    spec = OmegaConf.to_container(cfg.attack, resolve=True)
    name, eps = spec.pop("name"), parse_eps(spec.pop("eps", None))
    assert all(e is None or 0 < e <= 1 for e in eps)
    run = Run.build(compose("train", ["model.net.width=4", *SMALL], tmp_path / "model"))
    attack = build_attack(name, adapter_for(run.task), eps[0], **spec)
    assert attack.name == name and attack.eps == eps[0]


def build_cipher(option: str, tmp_path: Path, request: pytest.FixtureRequest, **_: Any) -> None:
    overrides = [f"cipher={option}"]
    if "ckpt_path" in OmegaConf.load(CONFIG_DIR / "cipher" / f"{option}.yaml"):  # learned: a trained one
        runs = request.getfixturevalue("gan_runs")
        overrides.append(f"ckpt_path={runs[option] / 'checkpoints' / 'best.ckpt'}")
    cipher = instantiate(compose("report", overrides, tmp_path).cipher)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    key = cipher.keygen()
    sealed = cipher.encrypt(images, key)
    assert sealed.images.shape == images.shape and sealed.images.dtype == np.uint8
    assert not np.array_equal(sealed.images, images)
    opened = cipher.decrypt(sealed, key)
    assert opened.shape == images.shape and cipher.lossless == np.array_equal(opened, images)


def build_federation(option: str, tmp_path: Path, **_: Any) -> None:
    cfg = compose("federate", [f"federation={option}", *SMALL], tmp_path)
    check(cfg)
    strategy = build_strategy(cfg.federation, num_sites(cfg), ndarrays_to_parameters([np.zeros(2, np.float32)]))
    assert type(base_strategy(strategy)) is STRATEGIES[cfg.federation.strategy]


def build_sweeper(option: str, tmp_path: Path, **_: Any) -> None:
    cfg = compose("train", [f"hparams_search={option}", *SMALL], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN and sweeper.n_trials > 0
    assert sweeper.direction in ("maximize", "minimize")
    sampler = instantiate(sweeper.sampler)
    assert class_name(sampler) == last(sweeper.sampler._target_)
    for key in sweeper.params:  # every swept key exists in the config it sweeps
        assert OmegaConf.select(cfg, key, default=None) is not None, key


BUILDERS: dict[str, Callable[..., None]] = {
    "data": build_data, "model": build_model, "task": build_task,
    "trainer": build_trainer_parts("trainer"), "callbacks": build_trainer_parts("callbacks"),
    "logger": build_trainer_parts("logger"), "debug": build_trainer_parts("debug"),
    "protect": build_protection("protect"), "crypto": build_protection("crypto"),
    "defense": build_protection("defense"),
    "attack": build_attack_option, "cipher": build_cipher, "hparams_search": build_sweeper,
    "federation": build_federation,
}


def test_every_group_is_built() -> None:
    assert set(groups()) == set(BUILDERS) | set(NOT_BUILT), "a config group without a builder here"
    assert set(options("model")) == set(MODEL_TASK), "conf/model and MODEL_TASK differ"
    assert set(options("task")) <= set(MODEL_TASK.values())


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in sorted(BUILDERS) for o in options(g)])
def test_every_option_composes_and_builds(group: str, option: str, tmp_path: Path, data_dir: Path,
                                          folder: Path, keys: Path, request: pytest.FixtureRequest) -> None:
    BUILDERS[group](option, tmp_path=tmp_path, data_dir=data_dir, folder=folder, keys=keys, request=request)


@pytest.mark.parametrize("command", sorted({*COMMANDS, "serve"}))
def test_every_command_config_composes(command: str, tmp_path: Path) -> None:
    needs_checkpoint = "ckpt_path" in OmegaConf.load(CONFIG_DIR / f"{command}.yaml")
    cfg = compose(command, ["ckpt_path=unused.ckpt"] if needs_checkpoint else [], tmp_path)
    assert cfg.task_name == command and Path(cfg.paths.output_dir) == (tmp_path / "run").resolve()


def test_paths_and_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose("train", [], tmp_path)
    assert cfg.paths.data_dir == default_data_dir()
    assert Path(cfg.hydra.run.dir) == (tmp_path / "run").resolve()
    monkeypatch.setenv("MEDSEC_DATA_DIR", str(tmp_path / "elsewhere"))
    assert compose("train", [], tmp_path).paths.data_dir == str((tmp_path / "elsewhere").resolve())


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_builds_task(experiment: str, tmp_path: Path, data_dir: Path) -> None:
    """The recipe on fake copies of its data: data module, task (with the data's classes), a batch
    through the recipe's pipeline, and the trainer with its callbacks (GPU recipes: all but the trainer)."""
    cfg = compose("train", [f"experiment={experiment}", f"paths.data_dir={data_dir}", "data.num_workers=0"],
                  tmp_path)
    assert str(cfg.data.source.get("root", data_dir)).startswith(str(data_dir))  # the fakes, never real data
    run = Run.build(cfg)
    task, datamodule = run.task, run.datamodule
    assert class_name(task) == last(cfg.task._target_)
    for key in ("num_classes", "class_names", "spatial_dims", "in_channels"):
        if key in task.hparams:
            assert task.hparams[key] == datamodule.task_info()[key], key
    assert run.monitor[0] == (cfg.monitor or task.monitor)
    datamodule.setup("fit")
    images = next(iter(datamodule.train_dataloader()))["image"]
    assert images.ndim == datamodule.spatial_dims + 2 and torch.isfinite(images).all()
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # the recipe's data and task are checked; its trainer needs a CUDA GPU
    trainer = run.trainer(run.callbacks())
    assert trainer.max_epochs == cfg.trainer.max_epochs
