"""Run an attack over a test set and measure what it does: metric before and after, success rate,
perturbation size and visibility (L-inf, L2, SSIM, PSNR), and time."""
from __future__ import annotations

import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from medsec.analysis.attacks.adapters import TaskAdapter
from medsec.analysis.attacks.defenses import get_defense
from medsec.analysis.attacks.registry import Attack
from medsec.errors import ConfigError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def parse_eps(values: Any) -> list[float | None]:
    """Epsilons from a config: numbers or fractions written as text (``"2/255"``); ``None`` for
    attacks without a budget."""
    if values is None:
        return [None]
    if isinstance(values, (int, float, str)):
        values = [values]
    parsed = []
    for value in values:
        try:
            parsed.append(float(Fraction(str(value).replace(" ", ""))))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"attack.eps: '{value}' is not a number or a fraction like 2/255") from None
    return parsed


def attack_targets(spec: str | int | None, victim: TaskAdapter, images: torch.Tensor, target: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor | None:
    """Target classes for a targeted attack: ``random`` (never the true class), ``least_likely`` or a
    class index; ``None`` for untargeted."""
    if spec is None:
        return None
    if victim.kind != "multiclass":
        raise ConfigError(f"targeted: targeted attacks need a multi-class model, not a {victim.kind} one")
    n = victim.num_classes
    if spec == "random":
        shift = torch.randint(1, n, target.shape, generator=generator)
        return (target + shift) % n
    if spec == "least_likely":
        with torch.no_grad():
            return victim(images).argmin(1)
    if isinstance(spec, int) and 0 <= spec < n:
        return torch.full_like(target, spec)
    raise ConfigError(f"targeted must be null, random, least_likely or a class index below {n}, got '{spec}'")


def _perceptual(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[float, float]:
    dims = clean.ndim - 2
    ssim = SSIMMetric(spatial_dims=dims, data_range=1.0, win_size=min(7, *clean.shape[2:]) | 1)
    psnr = PSNRMetric(max_val=1.0)
    return float(ssim(adversarial, clean).mean()), float(psnr(adversarial, clean).clamp(max=100).mean())


def run_attack(victim: TaskAdapter, attack: Attack, batches: Batches, *, targeted: str | int | None = None,
               defenses: Sequence[str] = ("none",), seed: int = 0, keep_images: bool = False,
               ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Attack every batch (crafted on ``attack.adapter``, which is the victim for white-box and a
    surrogate for transfer) and score it on ``victim`` under each defence.

    Returns one row per defence and the first batch's clean/adversarial images and predictions
    (for the sample grid), plus every clean and adversarial image when ``keep_images``.
    """
    generator = torch.Generator().manual_seed(seed)
    transforms = {name: get_defense(name) for name in defenses}
    clean_logits: dict[str, list[torch.Tensor]] = {d: [] for d in defenses}
    adv_logits: dict[str, list[torch.Tensor]] = {d: [] for d in defenses}
    targets, success = [], {d: [] for d in defenses}
    linf, l2, ssim, psnr, seconds = [], [], [], [], 0.0
    sample: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {"all_clean": [], "all_adversarial": [], "all_target": []}
    for images, target in batches:
        goal = attack_targets(targeted, victim, images, target, generator)
        start = time.perf_counter()
        adversarial = attack(images, target, goal)
        seconds += time.perf_counter() - start
        delta = (adversarial - images).flatten(1)
        linf.append(delta.abs().max(1).values)
        l2.append(delta.norm(dim=1))
        s, p = _perceptual(images, adversarial)
        ssim.append(s)
        psnr.append(p)
        targets.append(target)
        if keep_images:
            kept["all_clean"].append(images)
            kept["all_adversarial"].append(adversarial)
            kept["all_target"].append(target)
        with torch.no_grad():
            for name, transform in transforms.items():
                clean_in = transform(images) if transform else images
                adv_in = transform(adversarial) if transform else adversarial
                c, a = victim(clean_in), victim(adv_in)
                clean_logits[name].append(c)
                adv_logits[name].append(a)
                success[name].append(victim.success(c, a, target, goal))
        if not sample:
            sample = {"clean": images, "adversarial": adversarial, "target": target,
                      "clean_logits": clean_logits[defenses[0]][-1], "adv_logits": adv_logits[defenses[0]][-1]}
    if keep_images:
        sample |= {key: torch.cat(value) for key, value in kept.items()}
    count = sum(len(t) for t in targets)
    rows = []
    for name in defenses:
        clean_metric = victim.metric(clean_logits[name], targets)
        adv_metric = victim.metric(adv_logits[name], targets)
        rates = torch.cat(success[name])
        rows.append({
            "attack": attack.name, "eps": attack.eps, "norm": attack.norm, "defense": name,
            "targeted": targeted, "metric": victim.metric_name, "clean": clean_metric, "adversarial": adv_metric,
            "degradation_pct": 100 * (clean_metric - adv_metric) / clean_metric if clean_metric else None,
            "success_rate": float(np.nanmean(rates.numpy())) if (~torch.isnan(rates)).any() else None,
            "linf": float(torch.cat(linf).mean()), "l2": float(torch.cat(l2).mean()),
            "ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr)),
            "seconds": seconds, "images": count, "ms_per_image": 1000 * seconds / max(count, 1),
        })
    return rows, sample
