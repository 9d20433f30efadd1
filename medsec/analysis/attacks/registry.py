"""The attack registry: torchattacks for multi-class models, medsec's loss-agnostic gradient attacks
for multi-label and segmentation models, and the universal adversarial perturbation (UAP)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchattacks
from torch import nn

from medsec.analysis.attacks.adapters import TaskAdapter
from medsec.analysis.attacks.gradient import pgd, project, universal_perturbation
from medsec.core.registry import Named
from medsec.errors import ConfigError

JSMA_MAX_PIXELS = 64 * 64
TorchAttackFactory = Callable[[nn.Module, "float | None", Mapping[str, Any]], torchattacks.attack.Attack]


@dataclass(frozen=True)
class AttackSpec:
    """What an attack is and how it is built.

    Args:
        name: the name configs use (``attack=<name>``, ``conf/attack/<name>.yaml``).
        norm: the norm its perturbation is measured and projected in.
        budget: bounded by ``attack.eps`` (L-inf in [0, 1], or an L2 radius); unbounded attacks
            (C&W, DeepFool, JSMA) minimise the perturbation instead.
        multiclass_only: defined on class logits, so multi-class models only.
        torchattack: builds the torchattacks implementation used on multi-class models from
            (model, eps, params); ``None`` runs medsec's loss-agnostic gradient attack on every kind.
        single_step: the gradient attack takes one step of size eps (FGSM) instead of
            ``attack.steps`` steps of ``attack.alpha`` x eps.
        random_start: the gradient attack starts from a random point of the budget ball.
        universal: one perturbation fitted on training images, then added to every image (UAP).
    """

    name: str
    norm: Literal["linf", "l2"] = "linf"
    budget: bool = True
    multiclass_only: bool = False
    torchattack: TorchAttackFactory | None = None
    single_step: bool = False
    random_start: bool = False
    universal: bool = False


ATTACKS: Named[AttackSpec] = Named("attack", "attack.name")
"""Every attack by name; :func:`register_attack` adds one."""


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Make ``spec`` available as ``attack=<spec.name>`` (give it a ``conf/attack/<name>.yaml``)."""
    return ATTACKS.register(spec.name, spec)


def _alpha(eps: float | None, params: Mapping[str, Any]) -> float:
    return (eps or 0) * float(params.get("alpha", 0.25))


for _spec in (
    AttackSpec("fgsm", single_step=True, torchattack=lambda m, eps, p: torchattacks.FGSM(m, eps=eps)),
    AttackSpec("bim", torchattack=lambda m, eps, p: torchattacks.BIM(
        m, eps=eps, alpha=_alpha(eps, p), steps=int(p.get("steps", 10)))),
    AttackSpec("pgd", random_start=True, torchattack=lambda m, eps, p: torchattacks.PGD(
        m, eps=eps, alpha=_alpha(eps, p), steps=int(p.get("steps", 10)), random_start=True)),
    AttackSpec("pgdl2", norm="l2", random_start=True, torchattack=lambda m, eps, p: torchattacks.PGDL2(
        m, eps=eps, alpha=_alpha(eps, p), steps=int(p.get("steps", 10)), random_start=True)),
    AttackSpec("cw", norm="l2", budget=False, multiclass_only=True, torchattack=lambda m, eps, p: torchattacks.CW(
        m, c=float(p.get("c", 1.0)), kappa=float(p.get("kappa", 0.0)), steps=int(p.get("steps", 50)),
        lr=float(p.get("lr", 0.01)))),
    AttackSpec("deepfool", norm="l2", budget=False, multiclass_only=True, torchattack=lambda m, eps, p: torchattacks.DeepFool(
        m, steps=int(p.get("steps", 50)), overshoot=float(p.get("overshoot", 0.02)))),
    AttackSpec("jsma", budget=False, multiclass_only=True, torchattack=lambda m, eps, p: torchattacks.JSMA(
        m, theta=float(p.get("theta", 1.0)), gamma=float(p.get("gamma", 0.1)))),
    AttackSpec("uap", universal=True),
):
    register_attack(_spec)


class Attack:
    """A configured attack: ``attack(images, target, attack_target=None) -> adversarial images``.

    Args:
        name: a registered attack (:data:`ATTACKS`).
        adapter: the attacked model (its adapter gives logits and loss).
        eps: perturbation budget in [0, 1] pixel units (L-inf; L2 for ``pgdl2``); ``None`` for
            attacks without one (C&W, DeepFool, JSMA).
        params: attack options (``steps``, ``alpha`` as a fraction of eps, C&W ``c``/``kappa``/``lr``,
            DeepFool ``overshoot``, JSMA ``theta``/``gamma``, UAP ``epochs``).
    """

    def __init__(self, name: str, adapter: TaskAdapter, eps: float | None, params: Mapping[str, Any] | None = None) -> None:
        spec = ATTACKS[name]
        if spec.budget and (eps is None or eps <= 0 or (spec.norm == "linf" and eps > 1)):
            bound = "positive (an L2 radius in pixel units)" if spec.norm == "l2" else "in (0, 1] (pixel units, e.g. 2/255)"
            raise ConfigError(f"attack.eps for {name} must be {bound}, got {eps}")
        if spec.multiclass_only and adapter.kind != "multiclass":
            bounded = sorted(n for n in ATTACKS if ATTACKS[n].budget and not ATTACKS[n].multiclass_only)
            raise ConfigError(f"attack '{name}' works on multi-class classifiers only (it is defined on class "
                              f"logits); for a {adapter.kind} model use one of {bounded}")
        self.spec, self.name, self.adapter, self.eps = spec, name, adapter, eps if spec.budget else None
        self.params = dict(params or {})
        self.norm = spec.norm
        self.delta: torch.Tensor | None = None
        use_torchattacks = adapter.kind == "multiclass" and spec.torchattack is not None
        self._torchattack = spec.torchattack(adapter, self.eps, self.params) if use_torchattacks else None

    @property
    def needs_fit(self) -> bool:
        return self.spec.universal

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """UAP: compute the one perturbation from (images, target) training batches."""
        self.delta = universal_perturbation(self.adapter, self.adapter.loss, batches, self.eps,
                                            alpha=self.eps * float(self.params.get("alpha", 0.1)),
                                            epochs=int(self.params.get("epochs", 5)))
        return self.delta

    def __call__(self, images: torch.Tensor, target: torch.Tensor, attack_target: torch.Tensor | None = None) -> torch.Tensor:
        if attack_target is not None and self.adapter.kind != "multiclass":
            raise ConfigError(f"targeted attacks need a multi-class model, not a {self.adapter.kind} one")
        if self.spec.universal:
            if self.delta is None:
                raise ConfigError("the UAP must be fitted on training images before it is applied")
            return (images + self.delta).clamp(0, 1)
        if self._torchattack is not None:
            return self._run_torchattack(images, target, attack_target)
        steps = 1 if self.spec.single_step else int(self.params.get("steps", 10))
        alpha = self.eps if self.spec.single_step else _alpha(self.eps, self.params)
        return pgd(self.adapter, self.adapter.loss, images, target, self.eps, alpha, steps, self.norm,
                   random_start=self.spec.random_start)

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
