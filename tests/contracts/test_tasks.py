"""The task contract, for every registered task: composed from its real configs, it trains on tiny
data with the checkpoint and early-stopping callbacks set from its own ``monitor``/``mode`` (no
config restates them), logs that metric and its best-so-far value, declares its attack objective
(or refuses attacks with a ConfigError naming it), and writes test outputs only through the writer.

A newly registered task must add its recipe to RECIPES (and a ``conf/task`` config)."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import OmegaConf

from medsec.analysis.attacks import adapter_for, build_attack
from medsec.core.registry import registered
from medsec.data.datamodule import build_datamodule
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.utils.config import CONFIG_DIR, compose_config
from medsec.utils.outputs import OutputWriter
from tests.conftest import run_verb

TINY_GAN = ["data.source.num_samples=[16,8,8]", "data.source.image_size=32", "data.batch_size=8"]
RECIPES: dict[str, list[str]] = {
    # conf/task/<name>.yaml -> `medsec train` overrides for a tiny run of it
    "classification": ["data.source.num_samples=[32,16,16]", "data.source.image_size=24", "data.batch_size=16",
                       "model.net.width=8"],
    "segmentation": ["experiment=synthetic_unet2d", "data.source.num_samples=[16,8,8]", "data.source.image_size=16",
                     "data.batch_size=8", "model.net.channels=[8,16]", "model.net.strides=[2]", "task.roi_size=16"],
    "denoising": ["task=denoising", "model=dncnn", "data.source.num_samples=[32,16,16]", "data.source.image_size=16",
                  "data.batch_size=16", "model.net.depth=3", "model.net.features=8"],
    "compression": ["experiment=secure_compression_synthetic", "data.source.num_samples=[16,8,8]",
                    "data.batch_size=8", "model.net.N=8", "model.net.M=12"],
    "deepkeygen": ["experiment=deepkeygen_synthetic", *TINY_GAN],
    "encipher_gan": ["experiment=encipher_gan_synthetic", *TINY_GAN],
    "detection": ["experiment=synthetic_detection", "data.source.num_samples=[16,8,8]", "data.source.image_size=32",
                  "data.batch_size=8", "model.net.fpn_channels=16", "model.net.representation_size=32"],
}
ATTACK_KIND = {"classification": "multiclass", "segmentation": "segmentation", "detection": "detection"}
PER_SAMPLE_LOSS = ("classification", "segmentation")
"""Tasks with a per-sample loss (DP-SGD, membership audits); the others must say they have none."""
"""What attacks see of each attackable task; every other task must refuse attacks."""
OUTPUTS = {
    "classification": lambda names: names == ["plots/roc_curves.png", "plots/confusion_matrix.png", "predictions.csv"],
    "segmentation": lambda names: bool(names) and all(
        n.startswith("predictions/") and n.endswith(".nii.gz") or n.startswith("overlays/") and n.endswith(".png")
        for n in names) and sum(n.startswith("predictions/") for n in names) == 8,
    "denoising": lambda names: bool(names) and all(n.startswith("denoising/") and n.endswith(".png") for n in names),
    "compression": lambda names: names == [],
    "deepkeygen": lambda names: names == [],
    "encipher_gan": lambda names: names == [],
    "detection": lambda names: names[:3] == ["detections.json", "detections.csv", "plots/froc.png"] and all(
        n.startswith("overlays/") and n.endswith(".png") for n in names[3:]) and len(names) == 3 + 4,
}


def task_configs() -> dict[str, str]:
    """Registered task target -> the name of the ``conf/task`` config that builds it."""
    found = {}
    for path in sorted((CONFIG_DIR / "task").glob("*.yaml")):
        found[yaml.safe_load(path.read_text())["_target_"]] = path.stem
    return found


class Recording(OutputWriter):
    """Records what a task writes instead of writing it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.names: list[str] = []

    def write(self, name: str, data: bytes) -> Path:
        assert isinstance(data, bytes) and data, name
        self.names.append(name)
        return self.root / name


@pytest.mark.parametrize("target", sorted(registered("task")))
def test_task_contract(target: str, tmp_path: Path) -> None:
    configs = task_configs()
    assert target in configs, f"registered task {target} has no conf/task config"
    name = configs[target]
    assert name in RECIPES, f"add a tiny recipe for task={name} to RECIPES"
    cfg = compose_config("train", [*RECIPES[name], "data.num_workers=0"], output_dir=tmp_path / "run")
    try:
        datamodule = build_datamodule(cfg.data)
        task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
        task = instantiate(task_cfg, _convert_="all", **datamodule.task_info())
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(task, BaseTask) and task_cfg["_target_"] == target
    assert task.monitor.startswith("val/") and task.mode in ("max", "min"), (task.monitor, task.mode)

    # training, judged by the task's own metric (what the runner does for `monitor: null`)
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor=task.monitor, mode=task.mode)
    stopping = EarlyStopping(monitor=task.monitor, mode=task.mode, patience=5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                        limit_test_batches=1, num_sanity_val_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint, stopping])
    trainer.fit(task, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert task.monitor in logged and f"{task.monitor}_best" in logged, sorted(logged)
    value, best = float(logged[task.monitor]), float(logged[f"{task.monitor}_best"])
    if not math.isnan(value):
        assert (best >= value) if task.mode == "max" else (best <= value)
    assert Path(checkpoint.best_model_path).name == "best.ckpt"

    # the attack objective, or a clear refusal
    trainer.test(task, datamodule=datamodule, verbose=False)
    batch = next(iter(datamodule.test_dataloader()))
    if name in ATTACK_KIND:
        objective = task.attack_objective()
        victim = adapter_for(task)
        assert victim.kind == objective.kind == ATTACK_KIND[name]
        images, target_labels = batch["image"][:4], batch["label"][:4]
        adversarial = build_attack("fgsm", victim, 4 / 255)(images, target_labels)
        assert 0 < (adversarial - images).abs().max() <= 4 / 255 + 1e-6
        with torch.no_grad():
            clean_logits, adv_logits = victim(images), victim(adversarial)
        assert torch.isfinite(victim.loss(clean_logits, target_labels))
        assert isinstance(victim.metric([clean_logits], [target_labels]), float)
        assert victim.success(clean_logits, adv_logits, target_labels).shape == (len(images),)
    else:
        for attempt in (task.attack_objective, lambda: adapter_for(task)):
            with pytest.raises(ConfigError, match=f"^{type(task).__name__} cannot be attacked: "):
                attempt()

    # a per-sample loss (DP-SGD, membership audits): one value per sample, each its sample's alone
    if name in PER_SAMPLE_LOSS:
        assert type(task).has_sample_loss()
        images, targets = batch["image"][:3], batch["label"][:3]
        with torch.no_grad():
            outputs = task(images)
            losses = task.sample_loss(outputs, targets)
            alone = torch.stack([task.sample_loss(outputs[i:i + 1], targets[i:i + 1])[0] for i in range(3)])
        assert losses.shape == (3,) and torch.allclose(losses, alone, atol=1e-6)
    else:
        assert not type(task).has_sample_loss()
        with pytest.raises(ConfigError, match=f"^{type(task).__name__} declares no per-sample loss"):
            task.sample_loss(torch.zeros(1), torch.zeros(1))

    # test outputs only through the writer
    sink = tmp_path / "outputs"
    sink.mkdir()
    writer = Recording(sink)
    task.save_test_outputs(sink, writer)
    assert OUTPUTS[name](writer.names), writer.names
    assert not any(sink.iterdir())


def test_a_task_model_pair_trains_without_monitor_overrides(tmp_path: Path) -> None:
    """``medsec train task=denoising model=dncnn``: no experiment and no ``monitor=``; the run
    checkpoints on the task's own metric."""
    tiny = ["data.source.num_samples=[32,16,16]", "data.source.image_size=16", "data.num_workers=0",
            "model.net.depth=3", "model.net.features=8", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null"]
    metrics = run_verb("train", ["task=denoising", "model=dncnn", *tiny], tmp_path)
    assert "val/psnr_best" in metrics and "val/auroc" not in metrics
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
