"""Adversarial training as a protection: each training batch is (partly) replaced by adversarial
examples crafted on the fly, so any task trains robustly without a task class of its own."""
from __future__ import annotations

import lightning as L
import torch

from medsec.analysis.attacks.adapters import adapter_for
from medsec.analysis.attacks.evaluate import parse_eps
from medsec.analysis.attacks.gradient import pgd
from medsec.core.contracts import Protection
from medsec.errors import ConfigError


class AdversarialTraining(L.Callback, Protection):
    """Train on adversarial examples made on the fly (Madry et al. 2018 PGD-AT; with ``attack=fgsm``
    the "fast" FGSM-AT of Wong et al. 2020: random start, one step of 1.25 eps).

    Args:
        attack: ``pgd`` or ``fgsm``.
        eps: L-inf budget in pixel units.
        steps: PGD steps (ignored for ``fgsm``).
        alpha: PGD step as a fraction of ``eps``.
        ratio: fraction of each batch replaced by its adversarial version.
    """

    name = "adversarial_training"
    order = 90

    def __init__(self, attack: str = "pgd", eps: float | str = 2 / 255, steps: int = 7, alpha: float = 0.25,
                 ratio: float = 1.0) -> None:
        if attack not in ("pgd", "fgsm"):
            raise ConfigError(f"defense.attack must be pgd or fgsm, got '{attack}'")
        if not 0 < ratio <= 1:
            raise ConfigError(f"defense.ratio must be in (0, 1], got {ratio}")
        self.attack, self.eps, self.ratio = attack, parse_eps(eps)[0], ratio
        self.steps, self.alpha = (1, 1.25 * self.eps) if attack == "fgsm" else (steps, alpha * self.eps)

    def callbacks(self) -> list[L.Callback]:
        return [self]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        count = max(1, round(self.ratio * len(batch["image"])))
        adapter = adapter_for(pl_module, freeze=False)
        pl_module.eval()  # batch-norm statistics stay those of clean data while crafting
        try:
            adversarial = pgd(adapter, adapter.loss, batch["image"][:count], batch["label"][:count],
                              self.eps, self.alpha, self.steps, random_start=True)
        finally:
            pl_module.train()
        batch["image"] = torch.cat([adversarial, batch["image"][count:]])
