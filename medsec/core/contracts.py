"""The contract of a protection: the places where it may act on a run, each an optional hook.

A protection (AES store and sealing, perceptual encryption, adversarial training, and later
differential privacy) subclasses :class:`Protection` and overrides only the hooks it needs.
:class:`Protections` composes several in their declared ``order`` and refuses incompatible
combinations before any work starts.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader

from medsec.errors import ConfigError
from medsec.utils.outputs import OutputWriter


class Protection:
    """Base of every protection; every hook is a no-op here.

    Class attributes:
        name: the ``protect=[...]`` option it is selected by.
        order: where it acts in a composition (lower first: a source is decrypted before it is
            perceptually encrypted).
        confidential: whether it keeps images confidential (decrypted images must then not reach a
            logger: ``log_images`` is refused).
        conflicts: names of protections it cannot be combined with.
        config: the resolved config it was built from (set by :meth:`Protections.from_config`).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50
    confidential: ClassVar[bool] = False
    conflicts: ClassVar[tuple[str, ...]] = ()
    config: Mapping[str, Any] | None = None

    def check(self, task_info: Mapping[str, Any], task_target: str) -> None:
        """Refuse (``ConfigError``) a problem this protection cannot serve."""

    def wrap_source(self, source: Any) -> Any:
        """The data source the run reads (e.g. the encrypted store made from ``source``)."""
        return source

    def configure_model(self, task: L.LightningModule) -> None:
        """Change the model before training (e.g. replace layers DP-SGD cannot handle)."""

    def wrap_optimizers(self, optimizers: Any, task: L.LightningModule) -> Any:
        """What ``configure_optimizers`` returns, possibly wrapped (e.g. a DP optimizer)."""
        return optimizers

    def wrap_train_loader(self, loader: DataLoader) -> DataLoader:
        """The training loader, possibly replaced (e.g. Poisson sampling)."""
        return loader

    def callbacks(self) -> list[L.Callback]:
        """Lightning callbacks the protection needs during training."""
        return []

    def trainer_options(self) -> dict[str, Any]:
        """Lightning ``Trainer`` arguments the protection needs (e.g. no injected distributed sampler)."""
        return {}

    @property
    def seals(self) -> bool:
        """Whether it seals checkpoints or outputs (then it provides ``seal_to``/``open``/``output_writer``)."""
        return False

    def output_writer(self, root: str | Path) -> OutputWriter:
        return OutputWriter(root)


class Protections(Sequence[Protection]):
    """Protections composed in their declared order; at most one seals files."""

    def __init__(self, items: Iterable[Protection] = ()) -> None:
        items = list(items)
        names = [p.name for p in items]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"protect: {repeated} selected more than once (crypto= and protect= name the same one?)")
        for protection in items:
            clash = sorted(set(protection.conflicts) & set(names))
            if clash:
                raise ConfigError(f"protect: {protection.name} cannot be combined with {clash}")
        sealing = [p.name for p in items if p.seals]
        if len(sealing) > 1:
            raise ConfigError(f"protect: only one protection may seal files, got {sealing}")
        self._items = sorted(items, key=lambda p: p.order)

    @classmethod
    def from_config(cls, *groups: Mapping[str, Any] | None) -> Protections:
        """Build the protections configured under ``protect`` (a mapping name -> config) and the
        one-protection alias ``crypto`` (a single config); every ``_target_`` registry-checked."""
        from omegaconf import OmegaConf

        from medsec.core.registry import safe_instantiate

        items = []
        for group in groups:
            if not group:
                continue
            configs = [group] if "_target_" in group else list(group.values())
            for config in configs:
                protection = safe_instantiate(config, "protect", ("protection",))
                if not isinstance(protection, Protection):
                    raise ConfigError(f"protect: {config['_target_']} is not a medsec Protection")
                protection.config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) \
                    else dict(config)
                items.append(protection)
        return cls(items)

    def __getitem__(self, index: int) -> Protection:  # type: ignore[override]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._items]

    @property
    def confidential(self) -> bool:
        return any(p.confidential for p in self._items)

    @property
    def sealer(self) -> Protection | None:
        """The protection that seals checkpoints and outputs, if one does."""
        return next((p for p in self._items if p.seals), None)

    def check(self, task_info: Mapping[str, Any], task_target: str) -> None:
        for protection in self._items:
            protection.check(task_info, task_target)

    def wrap_source(self, source: Any) -> Any:
        for protection in self._items:
            source = protection.wrap_source(source)
        return source

    def configure_model(self, task: L.LightningModule) -> None:
        for protection in self._items:
            protection.configure_model(task)
        if any(type(p).wrap_optimizers is not Protection.wrap_optimizers for p in self._items):
            configure = task.configure_optimizers

            def configure_optimizers() -> Any:
                optimizers = configure()
                for protection in self._items:
                    optimizers = protection.wrap_optimizers(optimizers, task)
                return optimizers

            task.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def wrap_train_loader(self, loader: DataLoader) -> DataLoader:
        for protection in self._items:
            loader = protection.wrap_train_loader(loader)
        return loader

    def callbacks(self) -> list[L.Callback]:
        return [callback for protection in self._items for callback in protection.callbacks()]

    def trainer_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for protection in self._items:
            for key, value in protection.trainer_options().items():
                if options.get(key, value) != value:
                    raise ConfigError(f"protect: {protection.name} needs trainer.{key}={value}, another protection "
                                      f"needs {options[key]}")
                options[key] = value
        return options

    def output_writer(self, root: str | Path) -> OutputWriter:
        return self.sealer.output_writer(root) if self.sealer else OutputWriter(root)

    def stored(self) -> list[dict[str, Any]]:
        """The configs a checkpoint keeps so that reading its data again uses the same protections
        (key references only, never keys)."""
        return [dict(p.config) for p in self._items if p.config is not None and p.order < 50]
