"""MedicalDataModule: one LightningDataModule for every source, built on MONAI datasets."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose
from torch.utils.data import DataLoader

from medsec.data.intensity import intensity_modality
from medsec.data.sources.base import SPLITS, DataSource, Record, SourceData
from medsec.data.transforms import LoadImageNamed, classification_transforms
from medsec.errors import ConfigError

PAYLOAD_KEYS = ("image", "label", "mask", "record")
"""Record fields handed to the transform pipeline (``record``: a handle a source's reader opens)."""


class MedicalDataModule(L.LightningDataModule):
    """Split, transform and batch the records of a :class:`DataSource`.

    Args:
        source: the data source (synthetic, medmnist, chestxray14, folder, ...).
        batch_size: the *global* batch size; divided by the number of DDP processes.
        num_workers: DataLoader worker processes.
        in_channels: channels the network expects (1 or 3); images are converted.
        image_size: resize to this edge length; ``None`` keeps the source size.
        augment: random flips and small affine transforms on the training split.
        cache: keep the deterministic part of the pipeline in memory (MONAI ``CacheDataset``;
            nothing is written to disk).
        pipeline: builds each split's MONAI transforms (keyword arguments ``train``, ``reader``,
            ``in_channels``, ``spatial_dims``, ``image_size``, ``augment``, ``multilabel``,
            ``intensity``, ``labelled``);
            a ``_partial_`` config fixes the rest. Default: :func:`classification_transforms`.
        eval_batch_size: global batch size for validation and test (e.g. 1 for whole volumes);
            default ``batch_size``.
        train_subset: train on this many training records only, a seeded random choice (learning
            curves, small-data models for membership audits); ``None`` = all.
        intensity: the modality's intensity transforms, e.g. ``{modality: ct, window: lung}``
            (:mod:`medsec.data.intensity`); ``None``: 8-bit / 255, else min-max per image.
    """

    def __init__(
        self,
        source: DataSource,
        batch_size: int = 64,
        num_workers: int = 2,
        in_channels: int = 1,
        image_size: int | None = None,
        augment: bool = True,
        cache: bool = True,
        pin_memory: bool = False,
        pipeline: Callable[..., Compose] | None = None,
        eval_batch_size: int | None = None,
        train_subset: int | None = None,
        intensity: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1),
                            ("train_subset", 1 if train_subset is None else train_subset)):
            if value < 1:
                raise ConfigError(f"data.{name} must be positive, got {value}")
        self.source = source
        self.train_loader_hooks: list[Callable[[DataLoader], DataLoader]] = []
        """Applied in order to the training loader (a protection's ``wrap_train_loader``)."""
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.in_channels = in_channels
        self.image_size = image_size
        self.augment = augment
        self.cache = cache
        self.pin_memory = pin_memory
        self.pipeline = pipeline or classification_transforms
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_subset = train_subset
        intensity_modality(intensity)  # a bad intensity config fails here, before any data is read
        self.intensity = dict(intensity) if intensity else None
        self._data: SourceData | None = None
        self.datasets: dict[str, Dataset] = {}

    @property
    def data(self) -> SourceData:
        """The source's records, read once."""
        if self._data is None:
            self._data = self.source.load()
        return self._data

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def multilabel(self) -> bool:
        return self.data.multilabel

    @property
    def spatial_dims(self) -> int:
        return self.data.spatial_dims

    def class_counts(self) -> list[int] | None:
        """Training examples per class (multi-class data), e.g. for balanced class weights."""
        return self.data.class_counts()

    def task_info(self) -> dict[str, Any]:
        """What a task needs to know about the data to build its network, loss and metrics."""
        return {
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "multilabel": self.multilabel,
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "class_counts": self.class_counts(),
        }

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.dataset(self.records(split), train=split == "train")

    def records(self, split: str) -> list[Record]:
        """The records of ``split`` that the run uses (the training subset, if one is set)."""
        records = self.data.splits[split]
        if split != "train" or self.train_subset is None:
            return records
        if self.train_subset > len(records):
            raise ConfigError(f"data.train_subset={self.train_subset} exceeds the {len(records)} training records")
        keep = np.random.default_rng(0).permutation(len(records))[: self.train_subset]
        return [records[i] for i in sorted(keep)]

    def dataset(self, records: list[Record], train: bool = False) -> Dataset:
        """``records`` through the training pipeline (augmented) or the evaluation one."""
        reader = self.data.reader
        if reader is None and self.data.from_files:
            reader = LoadImageNamed(["image", "mask"], allow_missing_keys=True)
        transform = self.transforms(reader, self.data.spatial_dims, self.data.multilabel, train=train)
        payload = [{k: r[k] for k in PAYLOAD_KEYS if k in r} | {"id": r.get("id", str(i))}
                   for i, r in enumerate(records)]
        if self.cache:
            return CacheDataset(payload, transform, progress=False, num_workers=0)
        return Dataset(payload, transform)

    def transforms(self, reader: Callable[[Record], Record] | None, spatial_dims: int, multilabel: bool,
                   train: bool = False, labelled: bool = True) -> Compose:
        """The configured pipeline of one split (``train``: augmented), after ``reader``;
        ``labelled=False`` for records without labels (what ``medsec predict`` reads)."""
        return self.pipeline(train=train, reader=reader, in_channels=self.in_channels, spatial_dims=spatial_dims,
                             image_size=self.image_size, augment=self.augment, multilabel=multilabel,
                             intensity=self.intensity, labelled=labelled)

    def _per_device_batch(self, split: str) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        name, size = ("batch_size", self.batch_size) if split == "train" else ("eval_batch_size", self.eval_batch_size)
        if size % world and size >= world:
            raise ConfigError(f"data.{name}={size} is not divisible by the {world} DDP processes")
        return max(size // world, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(None)
        return DataLoader(
            self.datasets[split],
            batch_size=self._per_device_batch(split),
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        for hook in self.train_loader_hooks:
            loader = hook(loader)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def build_datamodule(cfg: Any, protections: Any = None) -> MedicalDataModule:
    """Instantiate the ``data`` config (registry-checked); ``protections`` wrap its source (an AES
    store, perceptual encryption) and its training loader."""
    from medsec.core.registry import safe_instantiate

    datamodule = safe_instantiate(cfg, "data", ("data",))
    if protections is not None:
        datamodule.source = protections.wrap_source(datamodule.source)
        datamodule.train_loader_hooks.append(protections.wrap_train_loader)
    return datamodule
