"""The model state that travels between server and sites: the floating-point entries of the task's
``state_dict`` (parameters and normalisation statistics), as NumPy arrays in ``state_dict`` order.
Integer buffers (BatchNorm's batch counters) stay local. Everything received is checked before use."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from medsec.errors import ConfigError

NDArrays = list[np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the arrays a model exchanges, in order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, task: L.LightningModule) -> Layout:
        state = {k: v for k, v in task.state_dict().items() if v.is_floating_point()}
        return cls(tuple(state), tuple(tuple(v.shape) for v in state.values()),
                   tuple(str(v.numpy().dtype) for v in state.values()))

    @property
    def digest(self) -> str:
        """A short fingerprint of the layout: sites refuse weights for another architecture."""
        text = ";".join(f"{k}:{s}:{d}" for k, s, d in zip(self.keys, self.shapes, self.dtypes))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def problem(self, arrays: Sequence[np.ndarray]) -> str | None:
        """Why ``arrays`` do not fit this layout (count, shape, dtype, non-finite values), or ``None``."""
        if len(arrays) != len(self.keys):
            return f"{len(arrays)} arrays, expected {len(self.keys)}"
        for key, shape, dtype, array in zip(self.keys, self.shapes, self.dtypes, arrays):
            if not isinstance(array, np.ndarray):
                return f"{key}: a {type(array).__name__}, not an array"
            if tuple(array.shape) != shape:
                return f"{key}: shape {tuple(array.shape)}, expected {shape}"
            if str(array.dtype) != dtype:
                return f"{key}: dtype {array.dtype}, expected {dtype}"
            if not np.isfinite(array).all():
                return f"{key}: holds NaN or infinite values"
        return None


def get_weights(task: L.LightningModule, layout: Layout) -> NDArrays:
    """The task's exchanged arrays (copies), in ``layout`` order."""
    state = task.state_dict()
    return [state[key].detach().cpu().numpy().copy() for key in layout.keys]


def as_layout_floats(arrays: Sequence[np.ndarray], layout: Layout) -> list[np.ndarray]:
    """Floating-point arrays in the layout's float types: aggregates may come back wider (SecAgg+
    dequantises to float64)."""
    if len(arrays) != len(layout.dtypes):
        return list(arrays)
    return [a.astype(d, copy=False) if isinstance(a, np.ndarray) and a.dtype.kind == "f" == np.dtype(d).kind else a
            for a, d in zip(arrays, layout.dtypes)]


def set_weights(task: L.LightningModule, layout: Layout, arrays: Sequence[np.ndarray], where: str) -> None:
    """Load ``arrays`` (cast by :func:`as_layout_floats`) into the task after checking them against
    ``layout``; a ``ConfigError`` naming ``where`` otherwise."""
    arrays = as_layout_floats(arrays, layout)
    problem = layout.problem(arrays)
    if problem is not None:
        raise ConfigError(f"{where}: the weights received do not fit the model ({problem})")
    state = {key: torch.from_numpy(np.array(a, copy=True)) for key, a in zip(layout.keys, arrays)}
    task.load_state_dict(state, strict=False)
