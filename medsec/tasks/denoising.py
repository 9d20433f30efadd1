"""Image denoising: any image-to-image network trained on clean images with on-the-fly noise."""
from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.utils import get_object
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from medsec.core.registry import check_targets
from medsec.data.noise import RandNoise, build_noise, level_slug, noise_class
from medsec.data.transforms import random_patches
from medsec.errors import ConfigError
from medsec.tasks.base import BaseTask
from medsec.utils.outputs import OutputWriter

LOSSES: dict[str, type[nn.Module]] = {"mse": nn.MSELoss, "l1": nn.L1Loss}
DEFAULT_NOISE = {"name": "gaussian", "levels": [0.02, 0.1]}


def accepted_arguments(target: Any, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``target`` (a class or function) takes as keyword arguments."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in parameters}


def noise_grid(test_noise: Mapping[str, Sequence[float]] | None, noise: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The (noise model, level) pairs the test covers: ``test_noise`` (name -> levels), else the
    training noise model at both ends of its level range."""
    if not test_noise:
        low, high = build_noise(noise).levels
        return [(noise["name"], level) for level in sorted({low, high})]
    grid = []
    for name, levels in test_noise.items():
        values = [levels] if isinstance(levels, (int, float)) else list(levels)
        try:
            model = noise_class(name)
            if not values:
                raise ConfigError("give at least one level")
            for level in values:
                model.check_level(float(level))
                grid.append((name, float(level)))
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"task.test_noise.{name}: {err}") from None
    return grid


def image_metrics(spatial_dims: int, **names: str) -> MetricCollection:
    """PSNR (mean over images), SSIM and MSE for images in [0, 1] (torchmetrics)."""
    per_image = tuple(range(1, spatial_dims + 2))
    return MetricCollection({
        "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=per_image, reduction="elementwise_mean"),
        "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        "mse": MeanSquaredError(),
    }, **names)


class DenoisingTask(BaseTask):
    """Learn to remove noise: clean images from the data module are corrupted on the fly by a
    seeded noise model (:mod:`medsec.data.noise`) and ``model.net`` maps them back.

    ``model.net`` is any network mapping (B, C, *spatial) to the same shape; it receives those of
    ``in_channels``, ``out_channels`` (= ``in_channels``) and ``spatial_dims`` that its constructor
    takes. Training uses random ``crop_size`` patches (whole images when ``None``); validation
    and test use whole images, with noise re-seeded each epoch so every epoch sees the same noise.

    Logs ``train/loss``, ``{val,test}/{loss,psnr,ssim,mse}`` (the training noise model),
    ``val/psnr_best``, and on test, for every (noise, level) of the grid,
    ``test/{psnr,ssim,mse}_<noise>_<level>`` of the output and ``test/noisy_{psnr,ssim,mse}_<noise>_<level>``
    of the noisy input, plus ``test/ms_per_image`` (network time). Metrics clamp outputs to [0, 1].
    :meth:`save_test_outputs` writes ``denoising/<noise>_<level>.png`` grids (noisy / denoised /
    clean) of the first test images.

    Args:
        model: the ``model`` config (``net`` with ``_target_``).
        optimizer, scheduler: ``_partial_`` configs.
        noise: training noise, ``{name: gaussian|poisson|rician|speckle, levels: [low, high]}``.
        test_noise: test grid, noise name -> levels; ``None``: the training noise at its range ends.
        loss: ``mse`` or ``l1``.
        crop_size: edge of the random training patches; ``None``: whole images.
        patches_per_image: patches cut from each training image per step.
        seed: seeds the noise (training; validation ``seed + 1``; test grid ``seed + 2 + k``).
        num_grid: test images drawn per grid PNG.
        in_channels, spatial_dims, class_names: from the data module (labels are ignored; the
            other data facts, ``num_classes``, ``multilabel``, ``class_counts``, are accepted and unused).

    Judged by ``val/psnr`` (max). Not attacked: a denoiser has no labels for an attack to flip
    (:meth:`attack_objective` says so).
    """

    monitor = "val/psnr"
    mode = "max"

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        noise: Mapping[str, Any] | None = None,
        test_noise: Mapping[str, Sequence[float]] | None = None,
        loss: str = "mse",
        crop_size: int | None = None,
        patches_per_image: int = 1,
        seed: int = 0,
        num_grid: int = 4,
        in_channels: int = 1,
        spatial_dims: int = 2,
        class_names: Sequence[str] | None = None,
        **data_info: Any,
    ) -> None:
        noise = dict(noise or DEFAULT_NOISE)
        if loss not in LOSSES:
            raise ConfigError(f"task.loss: unknown loss '{loss}'; choose one of {sorted(LOSSES)}")
        if patches_per_image < 1:
            raise ConfigError(f"task.patches_per_image must be positive, got {patches_per_image}")
        self.class_names = list(class_names or [])
        self.train_noise = build_noise(noise, seed=seed)
        self.val_noise = build_noise(noise, seed=seed + 1)
        self.grid = noise_grid(test_noise, noise)
        self.grid_noise: list[RandNoise] = [noise_class(name)(level, clip=self.train_noise.clip, seed=seed + 2 + k)
                                            for k, (name, level) in enumerate(self.grid)]
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler)
        self.examples: list[dict[str, Any]] = []
        self.net_seconds, self.net_images = 0.0, 0

    # ---- configure ---------------------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        net_cfg = hp.model.get("net") or {}
        if "_target_" not in net_cfg:
            raise ConfigError("model.net: the model config must give the network's _target_")
        check_targets(net_cfg, "model.net", ("network",))  # before importing anything it names
        try:
            target = get_object(net_cfg["_target_"])
        except Exception as err:  # Hydra raises several types for a bad path
            raise ConfigError(f"model.net._target_: cannot import '{net_cfg['_target_']}': {err}") from err
        offered = {"in_channels": hp.in_channels, "out_channels": hp.in_channels, "spatial_dims": hp.spatial_dims}
        self.net = self.build_net(**accepted_arguments(target, offered))

    def configure_losses(self) -> None:
        self.loss_fn = LOSSES[self.hparams.loss]()

    def configure_metrics(self) -> None:
        dims = self.hparams.spatial_dims
        self.val_metrics = image_metrics(dims, prefix="val/")
        self.test_metrics = image_metrics(dims, prefix="test/")
        self.grid_metrics = nn.ModuleList(
            image_metrics(dims, prefix="test/", postfix=f"_{name}_{level_slug(level)}") for name, level in self.grid)
        self.grid_noisy_metrics = nn.ModuleList(
            image_metrics(dims, prefix="test/noisy_", postfix=f"_{name}_{level_slug(level)}") for name, level in self.grid)

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def corrupt(images: torch.Tensor, noise: RandNoise) -> torch.Tensor:
        """Each image of the batch with its own noise draw (and level)."""
        return torch.stack([noise(image) for image in images])

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``patches_per_image`` random ``crop_size`` patches of every image (the images without ``crop_size``)."""
        return random_patches(images, self.hparams.crop_size, self.hparams.patches_per_image)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """The network's output clamped to [0, 1] (what metrics and pictures see)."""
        return self(noisy).clamp(0, 1)

    # ---- steps -------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        clean = self.patches(batch["image"])
        loss = self.loss_fn(self(self.corrupt(clean, self.train_noise)), clean)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(clean))
        return loss

    def _evaluate(self, clean: torch.Tensor, noise: RandNoise, stage: str) -> None:
        noisy = self.corrupt(clean, noise)
        output = self(noisy)
        getattr(self, f"{stage}_metrics").update(output.clamp(0, 1), clean)
        self.log(f"{stage}/loss", self.loss_fn(output, clean), on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(clean), sync_dist=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch["image"], self.val_noise, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        clean = batch["image"]
        self._evaluate(clean, self.val_noise, "test")
        for (name, level), noise, metrics, noisy_metrics in zip(self.grid, self.grid_noise, self.grid_metrics,
                                                                 self.grid_noisy_metrics):
            noisy = self.corrupt(clean, noise)
            denoised = self.timed_denoise(noisy)
            metrics.update(denoised, clean)
            noisy_metrics.update(noisy, clean)
            kept = self.hparams.num_grid - sum(len(e["clean"]) for e in self.examples if e["noise"] == (name, level))
            if kept > 0:
                self.examples.append({"noise": (name, level), "noisy": noisy[:kept].cpu(),
                                      "denoised": denoised[:kept].cpu(), "clean": clean[:kept].cpu()})

    def timed_denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """:meth:`denoise`, adding its wall time to the per-image timing."""
        if noisy.is_cuda:
            torch.cuda.synchronize(noisy.device)
        start = time.perf_counter()
        denoised = self.denoise(noisy)
        if noisy.is_cuda:
            torch.cuda.synchronize(noisy.device)
        self.net_seconds += time.perf_counter() - start
        self.net_images += len(noisy)
        return denoised

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.denoise(batch["image"])

    # ---- epoch hooks -------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self.val_noise.set_random_state(self.hparams.seed + 1)

    def validation_epoch_metrics(self) -> dict[str, Any]:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        return values

    def on_test_epoch_start(self) -> None:
        self.val_noise.set_random_state(self.hparams.seed + 1)
        for k, noise in enumerate(self.grid_noise):
            noise.set_random_state(self.hparams.seed + 2 + k)
        self.examples = []
        self.net_seconds, self.net_images = 0.0, 0

    def on_test_epoch_end(self) -> None:
        values: dict[str, Any] = {}
        for metrics in (self.test_metrics, *self.grid_metrics, *self.grid_noisy_metrics):
            values |= metrics.compute()
            metrics.reset()
        values["test/ms_per_image"] = 1000 * self.net_seconds / max(self.net_images, 1)
        self.log_dict(values)

    def save_test_outputs(self, out_dir: str | Path, writer: OutputWriter) -> None:
        """``denoising/<noise>_<level>.png``: noisy / denoised / clean for the first test images of
        every grid entry, through ``writer`` (sealed when the run encrypts its outputs)."""
        from medsec.viz.denoising import denoising_grid_png

        for name, level in self.grid:
            parts = [e for e in self.examples if e["noise"] == (name, level)]
            if not parts:
                continue
            images = {key: torch.cat([p[key] for p in parts]).float().numpy() for key in ("noisy", "denoised", "clean")}
            title = f"{name} noise, {noise_class(name).level_name} {level_slug(level)}"
            writer.write(f"denoising/{name}_{level_slug(level)}.png", denoising_grid_png(**images, title=title))

    # ---- contract ----------------------------------------------------------------------------
    def attack_objective(self) -> NoReturn:
        raise ConfigError(f"{type(self).__name__} cannot be attacked: a denoiser has no labels for an attack to "
                          "flip (attacks need a classification or segmentation task)")
