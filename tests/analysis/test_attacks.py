"""Attacks, adapters and defences on tiny models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medsec.analysis.attacks import ATTACKS, adapter_for, build_attack
from medsec.analysis.attacks.defenses import jpeg, median
from medsec.analysis.attacks.detector import detection_auc
from medsec.analysis.attacks.evaluate import parse_eps, run_attack
from medsec.analysis.attacks.registry import AttackSpec, register_attack
from medsec.data import MedicalDataModule
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import ConfigError
from medsec.protections.adversarial_training import AdversarialTraining
from medsec.tasks.classification import ClassificationTask
from medsec.tasks.segmentation import SegmentationTask

OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
SMALL_CNN = {"net": {"_target_": "medsec.models.small_cnn", "width": 8}}


@pytest.fixture(scope="module")
def trained(learned_run: Path) -> ClassificationTask:
    return ClassificationTask.load_from_checkpoint(learned_run / "checkpoints" / "best.ckpt", map_location="cpu")


@pytest.fixture(scope="module")
def test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    dm = MedicalDataModule(SyntheticSource(num_samples=(192, 64, 64), image_size=24, num_classes=3),
                           batch_size=32, num_workers=0, augment=False)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    return batch["image"], batch["label"]


def test_every_attack_config_names_a_registered_attack() -> None:
    from medsec.utils.config import REPO_ROOT

    configured = {OmegaConf.load(path).name for path in (REPO_ROOT / "conf" / "attack").glob("*.yaml")}
    assert configured == set(ATTACKS) and len(ATTACKS) == 8
    with pytest.raises(ValueError, match="attack 'pgd' is already registered"):
        register_attack(AttackSpec("pgd"))


def test_a_registered_attack_runs_on_every_task_kind(trained: ClassificationTask, test_batch) -> None:
    """A spec without a torchattacks implementation uses medsec's gradient attack, multi-class included."""
    images, labels = test_batch
    register_attack(AttackSpec("l2_step", norm="l2", single_step=True))
    try:
        victim = adapter_for(trained)
        attack = build_attack("l2_step", victim, 1.0)
        assert attack._torchattack is None and attack.norm == "l2"
        (row,), _ = run_attack(victim, attack, [(images, labels)])
        assert row["adversarial"] < row["clean"] and row["l2"] <= 1.0 + 1e-4
    finally:
        ATTACKS.unregister("l2_step")


PARAMS = {"cw": {"steps": 30, "c": 5.0, "lr": 0.05}, "deepfool": {"steps": 20}, "bim": {"steps": 5},
          "pgd": {"steps": 5}, "pgdl2": {"steps": 5}, "uap": {"epochs": 3}}


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_lowers_accuracy_within_its_budget(name: str, trained: ClassificationTask, test_batch) -> None:
    images, labels = test_batch
    if name == "jsma":
        images, labels = images[:12], labels[:12]
    victim = adapter_for(trained)
    eps = 2.0 if name == "pgdl2" else 16 / 255
    attack = build_attack(name, victim, eps, **PARAMS.get(name, {}))
    if attack.needs_fit:
        attack.fit([(images, labels)])
    (row,), _ = run_attack(victim, attack, [(images, labels)])
    assert row["adversarial"] < row["clean"], row
    # the victim stays in evaluation mode (dropout off, batch-norm running statistics): the clean
    # score is the model's own accuracy
    assert not victim.training and not trained.training
    with torch.no_grad():
        assert row["clean"] == pytest.approx((trained(images).argmax(1) == labels).float().mean().item())
    assert row["images"] == len(images) and 0 <= row["ssim"] <= 1
    adversarial = attack(images, labels)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    delta = (adversarial - images).flatten(1)
    if attack.norm == "linf" and attack.eps:
        assert delta.abs().max() <= eps + 1e-6  # the L-inf bound, up to float32 rounding
    if name == "pgdl2":
        assert delta.norm(dim=1).max() <= eps + 1e-4


def test_uap_is_one_perturbation_for_all_images(trained: ClassificationTask, test_batch) -> None:
    images, labels = test_batch
    images = images.clamp(0.1, 0.9)  # no clipping at [0, 1], so every image moves by the same delta
    attack = build_attack("uap", adapter_for(trained), 8 / 255, epochs=2)
    delta = attack.fit([(images, labels)])
    assert delta.shape == (1, *images.shape[1:]) and delta.abs().max() <= 8 / 255 + 1e-7
    moved = attack(images, labels) - images
    assert torch.allclose(moved, delta.expand_as(moved), atol=1e-6)


def test_targeted_pgd_reaches_its_target(trained: ClassificationTask, test_batch) -> None:
    images, labels = test_batch
    victim = adapter_for(trained)
    attack = build_attack("pgd", victim, 16 / 255, steps=10)
    (untargeted,), _ = run_attack(victim, attack, [(images, labels)])
    (targeted,), _ = run_attack(victim, attack, [(images, labels)], targeted="least_likely")
    assert targeted["success_rate"] > 0.3 and targeted["targeted"] == "least_likely"
    with pytest.raises(ConfigError, match="targeted must be null, random, least_likely or a class index below 3"):
        run_attack(victim, attack, [(images, labels)], targeted=7)


def test_multilabel_adapter_attacks_with_masked_bce() -> None:
    task = ClassificationTask(model=SMALL_CNN, num_classes=3, multilabel=True, optimizer=OPTIMIZER)
    victim = adapter_for(task)
    assert victim.kind == "multilabel"
    images = torch.rand(6, 1, 24, 24)
    target = torch.tensor([[1, 0, -1]] * 6, dtype=torch.float32)
    adversarial = build_attack("pgd", victim, 4 / 255, steps=3)(images, target)
    assert 0 < (adversarial - images).abs().max() <= 4 / 255 + 1e-6
    assert victim.loss(victim(adversarial), target) > victim.loss(victim(images), target)
    for name in ("cw", "deepfool", "jsma"):
        with pytest.raises(ConfigError, match=f"attack '{name}' works on multi-class classifiers only"):
            build_attack(name, victim)
    with pytest.raises(ConfigError, match="targeted attacks need a multi-class model"):
        build_attack("fgsm", victim, 4 / 255)(images, target, attack_target=torch.zeros(6, dtype=torch.long))


def test_segmentation_adapter_attacks_the_dice_ce_loss() -> None:
    task = SegmentationTask(model={"net": {"_target_": "monai.networks.nets.UNet", "channels": [4, 8],
                                           "strides": [2], "num_res_units": 0}},
                            num_classes=2, class_names=["a", "b"], spatial_dims=2, optimizer=OPTIMIZER,
                            roi_size=[16, 16])
    victim = adapter_for(task)
    images = torch.rand(2, 1, 16, 16)
    target = torch.randint(0, 3, (2, 1, 16, 16))
    adversarial = build_attack("fgsm", victim, 8 / 255)(images, target)
    assert victim.kind == "segmentation" and 0 < (adversarial - images).abs().max() <= 8 / 255 + 1e-6
    assert victim.loss(victim(adversarial), target) > victim.loss(victim(images), target)
    (row,), _ = run_attack(victim, build_attack("pgd", victim, 8 / 255, steps=2), [(images, target)])
    assert row["metric"] == "dice" and 0 <= row["clean"] <= 1


def test_bad_attack_settings_are_named(trained: ClassificationTask) -> None:
    victim = adapter_for(trained)
    with pytest.raises(ConfigError, match=r"attack.name: unknown attack 'onepixel'; one of \['bim', 'cw'"):
        build_attack("onepixel", victim, 0.1)
    with pytest.raises(ConfigError, match=r"attack.eps for pgd must be in \(0, 1\]"):
        build_attack("pgd", victim, 8)
    with pytest.raises(ConfigError, match="jsma builds a .* 16384 pixels is too many"):
        build_attack("jsma", victim)(torch.rand(1, 1, 128, 128), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs images of one size"):
        build_attack("uap", victim, 0.1).fit([(torch.rand(2, 1, 24, 24), torch.zeros(2, dtype=torch.long)),
                                              (torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))])
    assert parse_eps(["1/255", 0.5, "2 / 255"]) == [1 / 255, 0.5, 2 / 255]
    with pytest.raises(ConfigError, match="'two' is not a number"):
        parse_eps(["two"])


def test_input_defences_keep_shape_and_range() -> None:
    images = torch.rand(3, 1, 24, 24)
    for defence in (jpeg, median):
        out = defence(images)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, images)
    noisy = torch.full((1, 1, 9, 9), 0.5)
    noisy[0, 0, 4, 4] = 1.0
    assert median(noisy)[0, 0, 4, 4] == 0.5  # an isolated spike is removed
    with pytest.raises(ConfigError, match="jpeg defence needs 2D images"):
        jpeg(torch.rand(1, 1, 8, 8, 8))


def test_adversarial_training_replaces_the_batch_within_eps(trained: ClassificationTask, test_batch) -> None:
    images, labels = test_batch
    trained.requires_grad_(True)
    trained.train()
    for variant in (AdversarialTraining("pgd", eps="4/255", steps=2, ratio=0.5), AdversarialTraining("fgsm", eps=4 / 255)):
        batch = {"image": images.clone(), "label": labels}
        variant.on_train_batch_start(None, trained, batch, 0)
        changed = (batch["image"] != images).flatten(1).any(1)
        expected = round(variant.ratio * len(images))
        assert changed[:expected].all() and not changed[expected:].any()
        assert (batch["image"] - images).abs().max() <= 4 / 255 + 1e-6
        assert trained.training and all(p.requires_grad for p in trained.parameters())
    with pytest.raises(ConfigError, match="defense.attack must be pgd or fgsm"):
        AdversarialTraining("cw")


def test_detector_separates_adversarial_examples(trained: ClassificationTask, test_batch) -> None:
    images, labels = test_batch
    victim = adapter_for(trained)
    adversarial = build_attack("pgd", victim, 16 / 255, steps=5)(images, labels)
    result = detection_auc(victim, images, labels, images, adversarial, labels, k=10, folds=2)
    fooled = ((victim(images).argmax(1) == labels) & (victim(adversarial).argmax(1) != labels)).sum()
    assert result["pairs"] == int(fooled) > 0
    assert result["auc"] > 0.8 and 0 <= result["auc_all"] <= 1
    # too few fooled pairs for the folds: no AUC rather than a number from a handful of images
    few = detection_auc(victim, images, labels, images, images, labels, k=10)
    assert few["pairs"] == 0 and np.isnan(few["auc"])
