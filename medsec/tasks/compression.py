"""Learned lossy image compression: a CompressAI codec trained with the rate-distortion loss.

The task does not import CompressAI itself (its network does, when ``model.net`` is built).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn
from torchmetrics import MeanMetric

from medsec.core.registry import safe_instantiate
from medsec.data.transforms import random_patches
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.tasks.denoising import image_metrics


def bits_per_pixel(likelihoods: Mapping[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """The rate an ideal entropy coder reaches under the model: ``-sum log2 p`` over all latents,
    divided by the pixels (all images of the batch)."""
    return sum(-torch.log2(p).sum() for p in likelihoods.values()) / num_pixels


def rate_distortion(x_hat: torch.Tensor, target: torch.Tensor, likelihoods: Mapping[str, torch.Tensor],
                    lmbda: float) -> dict[str, torch.Tensor]:
    """``lmbda * 255^2 * MSE + bpp`` (the trade-off of Ballé et al. 2018 and CompressAI's training
    examples, MSE on [0, 1] images), with its two terms."""
    num_pixels = target.shape[0] * math.prod(target.shape[2:])
    bpp = bits_per_pixel(likelihoods, num_pixels)
    mse = nn.functional.mse_loss(x_hat, target)
    return {"loss": lmbda * 255**2 * mse + bpp, "bpp": bpp, "mse": mse}


class CompressionTask(BaseTask):
    """Train a learned codec (``model.net``: a CompressAI ``CompressionModel`` with
    ``forward_padded``, ``aux_loss`` and ``compress_image``, e.g.
    :class:`medsec.models.codec.HyperpriorCodec`) at one rate-distortion trade-off ``lmbda``.

    Training minimises ``lmbda * 255^2 * MSE + bpp`` on random ``crop_size`` patches plus
    CompressAI's auxiliary loss, which only moves the entropy bottleneck's quantiles (their own
    parameter group, learning rate ``aux_lr``; gradient clipping applies to the other group).
    Validation and test use whole images. Logs ``train/{loss,bpp,mse,aux_loss}``,
    ``{val,test}/{loss,bpp,psnr,ssim,mse}`` (``bpp``: the model's estimate) and ``test/coded_bpp``
    (the range coder's bit strings, without any packet framing).

    Args:
        model: the ``model`` config (``net`` with ``_target_``).
        optimizer, scheduler: ``_partial_`` configs.
        lmbda: weight of the distortion (higher: better quality, more bits).
        aux_lr: learning rate of the quantiles.
        crop_size: edge of the random training patches; ``None``: whole images.
        patches_per_image: patches cut from each training image per step.
        in_channels, spatial_dims, class_names: from the data module (labels are ignored).

    Judged by ``val/loss`` (min). Not attacked.
    """

    monitor = "val/loss"
    mode = "min"

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        lmbda: float = 0.01,
        aux_lr: float = 1e-3,
        crop_size: int | None = None,
        patches_per_image: int = 1,
        in_channels: int = 1,
        spatial_dims: int = 2,
        class_names: Sequence[str] | None = None,
        **data_info: Any,
    ) -> None:
        if not lmbda > 0:
            raise ConfigError(f"task.lmbda must be positive, got {lmbda}")
        if patches_per_image < 1:
            raise ConfigError(f"task.patches_per_image must be positive, got {patches_per_image}")
        if spatial_dims != 2:
            raise ConfigError(f"task=compression codes 2D images; the data have spatial_dims={spatial_dims}")
        self.class_names = list(class_names or [])  # the data's, checked when a checkpoint is opened
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler)

    # ---- configure ---------------------------------------------------------------------------
    def configure_models(self) -> None:
        self.net = self.build_net(in_channels=self.hparams.in_channels)

    def configure_losses(self) -> None:
        """The loss is :func:`rate_distortion` at ``lmbda`` plus the network's ``aux_loss``."""

    def configure_metrics(self) -> None:
        self.val_metrics = image_metrics(2, prefix="val/")
        self.test_metrics = image_metrics(2, prefix="test/")
        self.coded_bpp = MeanMetric()

    def configure_optimizers(self) -> dict[str, Any]:
        """One optimiser, two parameter groups: the network, and the quantiles at ``aux_lr``."""
        quantiles = [p for name, p in self.net.named_parameters() if name.endswith("quantiles")]
        ids = {id(p) for p in quantiles}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": main}, {"params": quantiles, "lr": self.hparams.aux_lr}]
        optimizer = safe_instantiate(self.hparams.optimizer, "task.optimizer", ("optimizer",))(params=groups)
        if not self.hparams.get("scheduler"):
            return {"optimizer": optimizer}
        scheduler = safe_instantiate(self.hparams.scheduler, "task.scheduler", ("scheduler",))(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the network's gradient norm only: the quantiles' gradient comes from the auxiliary
        loss and would otherwise scale the network's steps down."""
        if gradient_clip_val:
            nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], gradient_clip_val)

    # ---- steps -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.net.forward_padded(x)

    def rd(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction clamped to [0, 1] and the rate-distortion terms of ``images``."""
        out = self(images)
        terms = rate_distortion(out["x_hat"], images, out["likelihoods"], self.hparams.lmbda)
        return out["x_hat"].clamp(0, 1), terms

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = random_patches(batch["image"], self.hparams.crop_size, self.hparams.patches_per_image)
        _, terms = self.rd(images)
        aux = self.net.aux_loss()
        self.log_dict({"train/loss": terms["loss"], "train/bpp": terms["bpp"], "train/mse": terms["mse"],
                       "train/aux_loss": aux}, on_step=True, on_epoch=True, batch_size=len(images))
        return terms["loss"] + aux

    def _evaluate(self, images: torch.Tensor, stage: str) -> None:
        x_hat, terms = self.rd(images)
        getattr(self, f"{stage}_metrics").update(x_hat, images)
        self.log_dict({f"{stage}/loss": terms["loss"], f"{stage}/bpp": terms["bpp"]}, on_epoch=True,
                      prog_bar=stage == "val", batch_size=len(images), sync_dist=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch["image"], "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["image"]
        self._evaluate(images, "test")
        for image in images:
            y_string, z_string = self.net.compress_image(image)
            self.coded_bpp.update(8 * (len(y_string) + len(z_string)) / math.prod(image.shape[1:]))

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.rd(batch["image"])[0]

    # ---- epoch hooks -------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def validation_epoch_metrics(self) -> dict[str, Any]:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        return values

    def on_test_epoch_start(self) -> None:
        self.net.update(force=True)  # the coder's tables from the weights being tested

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute() | {"test/coded_bpp": self.coded_bpp.compute()}
        self.test_metrics.reset()
        self.coded_bpp.reset()
        self.log_dict(values)

    # ---- contract ----------------------------------------------------------------------------
    def attack_objective(self) -> NoReturn:
        raise ConfigError(f"{type(self).__name__} cannot be attacked: a codec has no labels for an attack to flip")
