"""Normalisation layers that keep samples independent: what per-sample gradients (DP-SGD) need.

BatchNorm mixes the samples of a batch (its statistics), so a network trained with differential
privacy uses GroupNorm instead: ``model.batch_norm=group`` builds any medsec network that way, and
``protect=[dp]`` sets it for networks that have BatchNorm.
"""
from __future__ import annotations

from torch import nn

from medsec.errors import ConfigError

BATCH_NORM_CHOICES = ("keep", "group")


def batch_norm_modules(net: nn.Module) -> list[str]:
    """Names of the BatchNorm layers in ``net``."""
    return [name for name, module in net.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def group_norm(net: nn.Module) -> nn.Module:
    """``net`` with every BatchNorm replaced by GroupNorm (Opacus' fixer: min(32, C) groups)."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(net) if batch_norm_modules(net) else net


def make_dp_compatible(net: nn.Module) -> nn.Module:
    """``net`` ready for per-sample gradient hooks: BatchNorm replaced, in-place activations turned
    off (an in-place op on a hooked output breaks the hooks); a ``ConfigError`` naming the modules
    Opacus still cannot train."""
    from opacus.validators import ModuleValidator

    net = group_norm(net)
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ConfigError(f"protect=[dp]: {type(net).__name__} has layers DP-SGD cannot train: "
                          + "; ".join(str(error) for error in errors[:5]))
    return net
