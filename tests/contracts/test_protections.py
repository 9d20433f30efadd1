"""The protection contract, parametrised over the registry: every protection composes through
``protect=[...]``, acts only through its hooks, round-trips what it protects, and compositions are
ordered and checked before any work starts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from medsec.core.contracts import Protection, Protections
from medsec.core.registry import registered
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.models.norms import batch_norm_modules
from medsec.protections import AESStage, KeyRef, SecretKey
from medsec.protections.adversarial_training import AdversarialTraining
from medsec.protections.keys import write_key_file
from medsec.protections.perceptual import PerceptualStage, as_uint8
from medsec.utils.config import compose_config
from tests.conftest import TINY, run_verb

PROTECTIONS = {"medsec.protections.AESStage": "aes", "medsec.protections.perceptual.PerceptualStage": "perceptual",
               "medsec.protections.adversarial_training.AdversarialTraining": "adversarial_training",
               "medsec.protections.dp.DifferentialPrivacy": "dp"}
KEYLESS = ("adversarial_training", "dp")
TINY_DATA = [o for o in TINY if o.startswith("data.")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("protect")
    key_file = write_key_file(root / "site.key", SecretKey.generate())
    refs = [f"protect.aes.key.file={key_file}", f"paths.store_dir={root / 'stores'}"]
    run_verb("encrypt", [*TINY_DATA, f"crypto.key.file={key_file}", f"paths.store_dir={root / 'stores'}"], root / "enc")
    return {"root": root, "key_file": key_file, "refs": refs}


def build(overrides: list[str], out: Path, tiny: bool = True) -> Run:
    cfg = compose_config("train", [*(TINY if tiny else []), *overrides], output_dir=out)
    try:
        return Run.build(cfg)
    finally:
        GlobalHydra.instance().clear()


def test_every_registered_protection_has_a_config_and_a_name() -> None:
    assert set(PROTECTIONS) == registered("protection")
    for target, name in PROTECTIONS.items():
        text = (Path("conf") / "protect" / f"{name}.yaml").read_text()
        assert f"# @package protect.{name}" in text and f"_target_: {target}" in text


def options(site: dict, name: str) -> list[str]:
    key = f"protect.{name}.key.file={site['key_file']}" if name not in KEYLESS else None
    return [f"protect=[{name}]", *([key] if key else []), f"paths.store_dir={site['root'] / 'stores'}"]


@pytest.mark.parametrize("name", sorted(PROTECTIONS.values()))
def test_each_protection_round_trips(site: dict, name: str, tmp_path: Path) -> None:
    plain = build([], tmp_path / "plain")
    run = build(options(site, name), tmp_path / name)
    assert run.protections.names == [name] and isinstance(run.protections[0], Protection)
    plain.datamodule.setup(None)
    run.datamodule.setup(None)
    clean = plain.datamodule.datasets["test"][0]["image"]
    seen = run.datamodule.datasets["test"][0]["image"]
    if name == "aes":  # decrypted from the store: exactly the plain pipeline's image
        assert torch.equal(seen, clean) and run.protections.sealer is run.protections[0]
    elif name == "perceptual":  # encrypted on reading; the key's inverse gives the source's image back
        data = run.datamodule.source.load()
        record = data.splits["test"][0]
        encrypted = data.reader(dict(record))["image"]
        source_image = as_uint8(plain.datamodule.source.load().splits["test"][0]["image"], "plain")
        assert not torch.equal(seen, clean) and not np.array_equal(encrypted, source_image)
        np.testing.assert_array_equal(run.protections[0].cipher().inverse(encrypted, record["id"]), source_image)
    elif name == "dp":  # the same images; the model made private: no BatchNorm, per-sample losses
        assert torch.equal(seen, clean) and run.task.per_sample_training
        assert run.task.hparams.model["batch_norm"] == "group" and not batch_norm_modules(run.task.net)
        assert run.protections.trainer_options() == {"use_distributed_sampler": False}
    else:  # adversarial training: a callback that replaces the batch within its epsilon
        callback = run.protections.callbacks()[0]
        assert isinstance(callback, AdversarialTraining) and callback in run.callbacks()
        batch = {"image": torch.rand(4, 1, 24, 24), "label": torch.tensor([0, 1, 2, 0])}
        original = batch["image"].clone()
        callback.on_train_batch_start(None, run.task, batch, 0)
        assert 0 < (batch["image"] - original).abs().max() <= callback.eps + 1e-6


def test_protections_compose_in_their_declared_order(site: dict, tmp_path: Path) -> None:
    run = build(["protect=[adversarial_training,perceptual,aes]", f"protect.aes.key.file={site['key_file']}",
                 f"protect.perceptual.key.file={site['key_file']}", f"paths.store_dir={site['root'] / 'stores'}"],
                tmp_path)
    assert run.protections.names == ["aes", "perceptual", "adversarial_training"]
    assert run.protections.confidential and run.protections.stored()[0]["_target_"] == "medsec.protections.AESStage"
    assert [p["_target_"].rsplit(".", 1)[-1] for p in run.info["protect"]] == ["AESStage", "PerceptualStage"]


def test_incompatible_compositions_are_refused_before_any_work(site: dict, tmp_path: Path) -> None:
    key = KeyRef(file=str(site["key_file"]))
    with pytest.raises(ConfigError, match=r"protect: \['aes'\] selected more than once"):
        Protections([AESStage(key=key), AESStage(key=key)])
    with pytest.raises(ConfigError, match="perceptual encrypts images only .* SegmentationTask is not supported"):
        build(["experiment=synthetic_unet2d", "data.num_workers=0", "protect=[perceptual]",
               f"protect.perceptual.key.file={site['key_file']}"], tmp_path / "seg", tiny=False)
    with pytest.raises(ConfigError, match=r"log_images=true would send decrypted images .*protect=\['perceptual'\]"):
        build([*options(site, "perceptual")[:2], "log_images=true"], tmp_path / "img")
    with pytest.raises(ConfigError, match="selected more than once"):  # crypto= and protect= both naming aes
        build(["crypto=aes", f"crypto.key.file={site['key_file']}", *options(site, "aes")], tmp_path / "twice")
    assert not (tmp_path / "seg" / "checkpoints").exists()


def test_crypto_is_still_an_alias_of_one_protection(site: dict, tmp_path: Path) -> None:
    run = build(["crypto=aes", f"crypto.key.file={site['key_file']}", f"paths.store_dir={site['root'] / 'stores'}"],
                tmp_path)
    assert run.protections.names == ["aes"] and isinstance(run.protections.sealer, AESStage)


def test_a_protection_can_wrap_the_optimizer_and_the_loader(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(Protection):
        name = "recording"

        def configure_model(self, task) -> None:
            calls.append("model")

        def wrap_optimizers(self, optimizers, task):
            calls.append("optimizer")
            return optimizers

        def wrap_train_loader(self, loader):
            calls.append("loader")
            return loader

    run = build([], tmp_path)
    protections = Protections([Recording()])
    protections.configure_model(run.task)
    run.datamodule.train_loader_hooks.append(protections.wrap_train_loader)
    run.task.configure_optimizers()
    run.datamodule.train_dataloader()
    assert calls == ["model", "optimizer", "loader"]
    assert isinstance(PerceptualStage(key=KeyRef(file="x")), Protection)
