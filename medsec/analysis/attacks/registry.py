"""The attack registry: torchattacks for multi-class models, medsec's loss-agnostic gradient attacks
for multi-label and segmentation models, and the universal adversarial perturbation (UAP)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torchattacks

from medsec.analysis.attacks.adapters import TaskAdapter
from medsec.analysis.attacks.gradient import pgd, project, universal_perturbation
from medsec.errors import ConfigError

ATTACKS = ("fgsm", "bim", "pgd", "pgdl2", "cw", "deepfool", "jsma", "uap")
EPS_ATTACKS = frozenset({"fgsm", "bim", "pgd", "pgdl2", "uap"})
"""Attacks bounded by an epsilon (L-inf, or L2 for pgdl2); the others minimise the perturbation."""
JSMA_MAX_PIXELS = 64 * 64
CLASS_LOGIT_ATTACKS = frozenset({"cw", "deepfool", "jsma"})
"""Defined on class logits: multi-class models only."""


class Attack:
    """A configured attack: ``attack(images, target, attack_target=None) -> adversarial images``.

    Args:
        name: one of :data:`ATTACKS`.
        adapter: the attacked model (its adapter gives logits and loss).
        eps: perturbation budget in [0, 1] pixel units (L-inf; L2 for ``pgdl2``); ``None`` for
            attacks without one (C&W, DeepFool, JSMA).
        params: attack options (``steps``, ``alpha`` as a fraction of eps, C&W ``c``/``kappa``/``lr``,
            DeepFool ``overshoot``, JSMA ``theta``/``gamma``, UAP ``epochs``).
    """

    def __init__(self, name: str, adapter: TaskAdapter, eps: float | None, params: Mapping[str, Any] | None = None) -> None:
        if name not in ATTACKS:
            raise ConfigError(f"attack.name must be one of {list(ATTACKS)}, got '{name}'")
        if name in EPS_ATTACKS and (eps is None or eps <= 0 or (name != "pgdl2" and eps > 1)):
            bound = "positive (an L2 radius in pixel units)" if name == "pgdl2" else "in (0, 1] (pixel units, e.g. 2/255)"
            raise ConfigError(f"attack.eps for {name} must be {bound}, got {eps}")
        if name in CLASS_LOGIT_ATTACKS and adapter.kind != "multiclass":
            raise ConfigError(f"attack '{name}' works on multi-class classifiers only (it is defined on class "
                              f"logits); for a {adapter.kind} model use one of {sorted(EPS_ATTACKS)}")
        self.name, self.adapter, self.eps = name, adapter, eps if name in EPS_ATTACKS else None
        self.params = dict(params or {})
        self.norm = "l2" if name in ("pgdl2", "cw", "deepfool") else "linf"
        self.delta: torch.Tensor | None = None
        self._torchattack = self._make_torchattack() if adapter.kind == "multiclass" and name != "uap" else None

    def _make_torchattack(self) -> torchattacks.attack.Attack:
        p, eps, model = self.params, self.eps, self.adapter
        steps = int(p.get("steps", 10))
        alpha = (eps or 0) * float(p.get("alpha", 0.25))
        factories: dict[str, Callable[[], torchattacks.attack.Attack]] = {
            "fgsm": lambda: torchattacks.FGSM(model, eps=eps),
            "bim": lambda: torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps),
            "pgd": lambda: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
            "pgdl2": lambda: torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
            "cw": lambda: torchattacks.CW(model, c=float(p.get("c", 1.0)), kappa=float(p.get("kappa", 0.0)),
                                          steps=int(p.get("steps", 50)), lr=float(p.get("lr", 0.01))),
            "deepfool": lambda: torchattacks.DeepFool(model, steps=int(p.get("steps", 50)),
                                                      overshoot=float(p.get("overshoot", 0.02))),
            "jsma": lambda: torchattacks.JSMA(model, theta=float(p.get("theta", 1.0)), gamma=float(p.get("gamma", 0.1))),
        }
        return factories[self.name]()

    @property
    def needs_fit(self) -> bool:
        return self.name == "uap"

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """UAP: compute the one perturbation from (images, target) training batches."""
        self.delta = universal_perturbation(self.adapter, self.adapter.loss, batches, self.eps,
                                            alpha=self.eps * float(self.params.get("alpha", 0.1)),
                                            epochs=int(self.params.get("epochs", 5)))
        return self.delta

    def __call__(self, images: torch.Tensor, target: torch.Tensor, attack_target: torch.Tensor | None = None) -> torch.Tensor:
        if attack_target is not None and self.adapter.kind != "multiclass":
            raise ConfigError(f"targeted attacks need a multi-class model, not a {self.adapter.kind} one")
        if self.name == "uap":
            if self.delta is None:
                raise ConfigError("the UAP must be fitted on training images before it is applied")
            return (images + self.delta).clamp(0, 1)
        if self._torchattack is not None:
            return self._run_torchattack(images, target, attack_target)
        steps = 1 if self.name == "fgsm" else int(self.params.get("steps", 10))
        alpha = self.eps if self.name == "fgsm" else self.eps * float(self.params.get("alpha", 0.25))
        return pgd(self.adapter, self.adapter.loss, images, target, self.eps, alpha, steps, self.norm,
                   random_start=self.name in ("pgd", "pgdl2"))

    def _run_torchattack(self, images: torch.Tensor, target: torch.Tensor, attack_target: torch.Tensor | None) -> torch.Tensor:
        attack = self._torchattack
        pixels = images[0].numel()
        if self.name == "jsma" and pixels > JSMA_MAX_PIXELS:
            raise ConfigError(f"jsma builds a (pixels x pixels) saliency map per image: {pixels} pixels is too many "
                              f"(at most {JSMA_MAX_PIXELS}, e.g. 64x64); resize with data.image_size")
        if self.name == "jsma" and attack_target is None:
            # JSMA is a targeted attack; torchattacks' untargeted default aims at (label + 1) % 10,
            # which indexes past the logits of models with fewer than 10 classes
            attack_target = (target + 1) % self.adapter.num_classes
        if attack_target is None:
            attack.targeted, attack.attack_mode = False, "default"  # set_mode_default() would print
        elif "targeted" not in attack.supported_mode:
            raise ConfigError(f"torchattacks' {self.name} has no targeted mode")
        else:
            attack.set_mode_targeted_by_function(lambda imgs, labels: attack_target, quiet=True)
        try:
            adversarial = attack(images, target)
        except RuntimeError as err:
            raise ConfigError(f"torchattacks' {self.name} failed on {tuple(images.shape)} images "
                              f"({images.shape[1]} channel(s)): {err}") from err
        return project(adversarial, images, self.eps, self.norm) if self.eps else adversarial.clamp(0, 1)


def build_attack(name: str, adapter: TaskAdapter, eps: float | None = None, **params: Any) -> Attack:
    """An :class:`Attack` by name."""
    return Attack(name, adapter, eps, params)
