"""Input-transformation defences applied at evaluation, and adversarial training as a callback."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from monai.networks.layers import median_filter
from torchvision.io import decode_jpeg, encode_jpeg

from medsec.attacks.adapters import adapter_for
from medsec.attacks.gradient import pgd
from medsec.errors import ConfigError

Defense = Callable[[torch.Tensor], torch.Tensor]


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Re-encode each 2D image as JPEG at ``quality`` (removes high-frequency perturbations)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"the jpeg defence needs 2D images with 1 or 3 channels, got shape {tuple(images.shape)}")
    as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    decoded = [decode_jpeg(encode_jpeg(image, quality=quality)) for image in as_bytes]
    return torch.stack(decoded).to(images.device, torch.float32) / 255


def median(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Median filter over each channel (2D or 3D)."""
    return median_filter(images, kernel_size=size)


DEFENSES: dict[str, Defense | None] = {"none": None, "jpeg": jpeg, "median": median}


def get_defense(name: str) -> Defense | None:
    if name not in DEFENSES:
        raise ConfigError(f"defenses: unknown defence '{name}'; choose from {list(DEFENSES)}")
    return DEFENSES[name]


class AdversarialTraining(L.Callback):
    """Train on adversarial examples made on the fly (Madry et al. 2018 PGD-AT; with ``attack=fgsm``
    the "fast" FGSM-AT of Wong et al. 2020: random start, one step of 1.25 eps).

    Args:
        attack: ``pgd`` or ``fgsm``.
        eps: L-inf budget in pixel units.
        steps: PGD steps (ignored for ``fgsm``).
        alpha: PGD step as a fraction of ``eps``.
        ratio: fraction of each batch replaced by its adversarial version.
    """

    def __init__(self, attack: str = "pgd", eps: float | str = 2 / 255, steps: int = 7, alpha: float = 0.25,
                 ratio: float = 1.0) -> None:
        from medsec.attacks.evaluate import parse_eps

        if attack not in ("pgd", "fgsm"):
            raise ConfigError(f"defense.attack must be pgd or fgsm, got '{attack}'")
        if not 0 < ratio <= 1:
            raise ConfigError(f"defense.ratio must be in (0, 1], got {ratio}")
        self.attack, self.eps, self.ratio = attack, parse_eps(eps)[0], ratio
        self.steps, self.alpha = (1, 1.25 * self.eps) if attack == "fgsm" else (steps, alpha * self.eps)

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
