"""The allowlist of what a config may build.

Hydra builds any importable callable named by ``_target_``; a config read from a file someone sent
(the run information and hyper-parameters inside a checkpoint) must not. Every ``_target_`` at
every depth of such a config is checked against this registry before anything is instantiated,
and the tasks check their own network, optimiser and scheduler configs the same way. A new
network, source or task is usable once it is registered here (or with :func:`register`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from medsec.errors import ConfigError

SPECIAL_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})

_REGISTRY: dict[str, set[str]] = {
    "task": {
        "medsec.tasks.ClassificationTask",
        "medsec.tasks.segmentation.SegmentationTask",
        "medsec.tasks.denoising.DenoisingTask",
        "medsec.tasks.compression.CompressionTask",
        "medsec.tasks.deepkeygen.DeepKeyGenTask",
        "medsec.tasks.encipher_gan.EncipherGANTask",
        "medsec.tasks.detection.DetectionTask",
    },
    "network": {
        "medsec.models.small_cnn", "medsec.models.resnet", "medsec.models.densenet121", "medsec.models.he_cnn",
        "medsec.models.he_cnn_deep",
        "medsec.models.codec.HyperpriorCodec",
        "medsec.models.denoisers.DenoisingAutoencoder", "medsec.models.denoisers.DnCNN",
        "medsec.models.deepkeygen.KeyGenerator", "medsec.models.deepkeygen.PatchCritic",
        "medsec.models.encipher_gan.KeyedUNet", "medsec.models.encipher_gan.PatchCritic",
        "monai.networks.nets.UNet", "monai.networks.nets.SegResNet", "monai.networks.nets.DynUNet",
        "monai.networks.nets.AutoEncoder",
        "medsec.models.baselines.GaussianFilter", "medsec.models.baselines.NonLocalMeans",
        "medsec.models.detectors.torchvision_detector", "medsec.models.detectors.monai_retinanet",
    },
    "data": {
        "medsec.data.MedicalDataModule",
        "medsec.data.segmentation.segmentation_transforms",
        "medsec.data.sources.synthetic.SyntheticSource",
        "medsec.data.sources.medmnist.MedMNISTSource",
        "medsec.data.sources.chestxray14.ChestXray14Source",
        "medsec.data.sources.folder.FolderSource",
        "medsec.data.sources.image_masks.ImageMaskSource",
        "medsec.data.sources.decathlon.DecathlonSource",
        "medsec.data.sources.decathlon_slices.DecathlonSlicesSource",
        "medsec.data.sources.partition.PartitionSource",
        "medsec.data.detection.detection_transforms",
        "medsec.data.sources.boxes.NIHBoxSource", "medsec.data.sources.boxes.CocoSource",
    },
    "optimizer": {"torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD", "torch.optim.RMSprop"},
    "scheduler": {
        "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
        "torch.optim.lr_scheduler.ReduceLROnPlateau", "torch.optim.lr_scheduler.OneCycleLR",
    },
    "protection": {"medsec.protections.AESStage", "medsec.protections.perceptual.PerceptualStage",
                   "medsec.protections.adversarial_training.AdversarialTraining",
                   "medsec.protections.dp.DifferentialPrivacy"},
    "cipher": {
        "medsec.analysis.ciphers.classical.AESCTRCipher", "medsec.analysis.ciphers.classical.ChaoticCipher",
        "medsec.analysis.ciphers.learned.DeepKeyGenCipher.from_checkpoint",
        "medsec.analysis.ciphers.learned.EncipherGANCipher.from_checkpoint",
    },
    "runtime": {
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.EarlyStopping", "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.RichModelSummary",
        "lightning.pytorch.callbacks.RichProgressBar", "medsec.utils.callbacks.TrainThroughput",
        "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.WandbLogger",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "optuna.samplers.TPESampler",
    },
}
KINDS = tuple(_REGISTRY)
T = TypeVar("T")


class Named(Generic[T]):
    """The implementations of one extension point by the name a config gives (``attack=pgd``,
    ``scheme=ckks``): what a name may select is what was registered here, nothing importable."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Make ``item`` selectable as ``name``; a name is registered once."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.field}: unknown {self.kind} '{name}'; one of {sorted(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)


def register(kind: str, target: str) -> None:
    """Allow configs to build ``target`` (a dotted import path) as a ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown kind {kind!r}; one of {list(KINDS)}")
    _REGISTRY[kind].add(target)


def registered(*kinds: str) -> frozenset[str]:
    """The targets registered under ``kinds`` (all kinds when none are given)."""
    unknown = [kind for kind in kinds if kind not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; one of {list(KINDS)}")
    return frozenset().union(*(_REGISTRY[kind] for kind in kinds or KINDS))


def _walk(node: Any, path: str) -> Iterable[tuple[str, str, Any]]:
    """(dotted path, key, value) for every mapping entry and list item below ``node``."""
    if isinstance(node, Mapping):
        items = ((str(key), value) for key, value in node.items())
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        items = ((f"[{index}]", value) for index, value in enumerate(node))
    else:
        return
    for key, value in items:
        child = f"{path}{key}" if key.startswith("[") else f"{path}.{key}" if path else key
        yield child, key, value
        yield from _walk(value, child)


def check_targets(tree: Any, where: str, kinds: Iterable[str] = (), root: str = "") -> None:
    """Refuse (``ConfigError`` naming ``where`` and the key's path below ``root``) any ``_target_``
    in ``tree``, at any depth, that is not registered under ``kinds`` (all kinds when empty)."""
    kinds = tuple(kinds)
    allowed = registered(*kinds)
    for path, key, value in _walk(tree, root):
        if key == "_target_" and (not isinstance(value, str) or value not in allowed):
            kind = "/".join(kinds) or "medsec"
            raise ConfigError(f"{where}: {path} = {str(value)[:120]!r} is not a registered {kind} target; "
                              "refusing to build it")


def check_stored(tree: Any, where: str, kinds: Iterable[str] = (), root: str = "") -> None:
    """:func:`check_targets`, and refuse what only a config typed by the user may hold: OmegaConf
    interpolations (``${oc.env:...}`` would read the environment, keys included) and Hydra keys
    other than the ones that describe a call."""
    for path, key, value in _walk(tree, root):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{where}: {path} holds an interpolation; stored configs must be resolved values")
        if key.startswith("_") and key.endswith("_") and key not in SPECIAL_KEYS:
            raise ConfigError(f"{where}: {path} is not a key a stored config may hold")
    check_targets(tree, where, kinds, root)


def safe_instantiate(cfg: Any, where: str, kinds: Iterable[str], **kwargs: Any) -> Any:
    """Hydra's ``instantiate`` after :func:`check_targets`."""
    from hydra.utils import instantiate

    kinds = tuple(kinds)
    check_targets(cfg, where, kinds)
    return instantiate(cfg, **kwargs)
