"""Loss-agnostic gradient attacks (torchattacks hard-codes cross-entropy) and the universal
adversarial perturbation (which torchattacks lacks)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from medsec.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project(adversarial: torch.Tensor, clean: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Bring ``adversarial`` back into the ``norm`` ball of radius ``eps`` around ``clean`` and [0, 1]."""
    delta = adversarial - clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (delta.ndim - 1)))
        delta = delta * torch.clamp(eps / norms, max=1.0)
    return (clean + delta).clamp(0, 1)


def _step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (grad.ndim - 1)))
    return grad / norms


def pgd(model: Callable[[torch.Tensor], torch.Tensor], loss_fn: LossFn, images: torch.Tensor, target: torch.Tensor,
        eps: float, alpha: float, steps: int, norm: str = "linf", random_start: bool = True) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn(model(x), target)`` within an ``eps`` ball.

    FGSM is one step with ``alpha = eps`` and no random start; BIM is PGD without random start.
    """
    clean = images.detach()
    adversarial = clean.clone()
    if random_start:
        noise = torch.empty_like(clean).uniform_(-eps, eps) if norm == "linf" else torch.randn_like(clean) * eps / 4
        adversarial = project(clean + noise, clean, eps, norm)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = loss_fn(model(adversarial), target)
        (grad,) = torch.autograd.grad(loss, adversarial)
        adversarial = project(adversarial.detach() + alpha * _step(grad, norm), clean, eps, norm)
    return adversarial.detach()


def universal_perturbation(model: Callable[[torch.Tensor], torch.Tensor], loss_fn: LossFn,
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float, alpha: float,
                           epochs: int = 5) -> torch.Tensor:
    """One perturbation for every image (a UAP): stochastic projected gradient ascent of the mean
    loss over training batches, kept within ``eps`` (L-inf). Returns ``delta`` with batch dimension 1."""
    batches = list(batches)
    shapes = {tuple(images.shape[1:]) for images, _ in batches}
    if len(shapes) != 1:
        raise ConfigError(f"a universal perturbation needs images of one size; these have {sorted(shapes)} "
                          "(set data.image_size, or use a per-image attack)")
    delta = torch.zeros_like(batches[0][0][:1])
    for _ in range(epochs):
        for images, target in batches:
            delta.requires_grad_(True)
            loss = loss_fn(model((images + delta).clamp(0, 1)), target)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return delta.detach()
