"""One site's share of a data set, for simulating federated training across hospitals.

:class:`PartitionSource` wraps another source and keeps the training and validation records that
fall to site ``site`` of ``num_sites``; the test split stays whole (the global test set). Records
that share a ``patient`` (or ``group``) key always fall to the same site. Three schemes:

* ``iid``: groups shuffled and dealt so that every site holds about as many records;
* ``dirichlet``: label skew (Hsu et al. 2019): for every class, the shares of the sites are drawn
  from Dirichlet(``alpha``); a small ``alpha`` gives each site a few dominant classes;
* ``quantity``: size skew: the sites' shares of the records are drawn from Dirichlet(``alpha``).

The shares are drawn once and applied to the training and the validation split alike.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from medsec.data.sources.base import DataSource, Record, SourceData
from medsec.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "quantity")
PARTITIONED = ("train", "val")
GROUP_KEYS = ("patient", "group")
MAX_DRAWS = 100
"""Dirichlet draws tried before a partition with an empty site is refused."""


def group_of(record: Record, index: int) -> Hashable:
    """The key that keeps a patient's records together: ``patient``, else ``group``, else the record."""
    for key in GROUP_KEYS:
        if record.get(key) is not None:
            return f"{key}:{record[key]}"
    return f"record:{record.get('id', index)}"


def _groups(records: list[Record]) -> list[list[int]]:
    """Record indices grouped by :func:`group_of`, in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(group_of(record, i), []).append(i)
    return list(groups.values())


def _label(records: list[Record], members: list[int], field: str) -> int:
    """The majority class of a group (multi-class labels only)."""
    labels = []
    for i in members:
        label = records[i].get("label")
        if label is None or np.ndim(label) != 0:
            raise ConfigError(f"{field}: scheme=dirichlet needs one class label per record (multi-class data); "
                              "use scheme=iid or scheme=quantity")
        labels.append(int(label))
    return int(np.bincount(labels).argmax())


def _deal(groups: list[list[int]], num_sites: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled groups, each to the site that holds the fewest records so far."""
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    for g in rng.permutation(len(groups)):
        min(sites, key=len).extend(groups[g])
    return sites


def _cut(groups: list[list[int]], shares: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled groups split into consecutive runs holding about ``shares`` of the records."""
    order = [groups[g] for g in rng.permutation(len(groups))]
    sizes = np.cumsum([len(members) for members in order])
    bounds = np.cumsum(shares)[:-1] * (sizes[-1] if len(sizes) else 0)
    site_of = np.searchsorted(bounds, sizes - 0.5 * np.asarray([len(m) for m in order]), side="right")
    sites: list[list[int]] = [[] for _ in shares]
    for members, site in zip(order, site_of):
        sites[int(site)].extend(members)
    return sites


class PartitionSource(DataSource):
    """Site ``site``'s share (of ``num_sites``) of the training and validation records of ``source``.

    Args:
        source: the data source to split (an instance, or a config with a registered ``_target_``).
        num_sites: how many sites share the data.
        site: which share this source reads (0-based).
        scheme: ``iid``, ``dirichlet`` (label skew) or ``quantity`` (size skew).
        alpha: the Dirichlet concentration (``dirichlet``, ``quantity``): smaller is more skewed.
        seed: the same seed gives the same partition.
    """

    def __init__(self, source: DataSource | Mapping[str, Any], num_sites: int, site: int, scheme: str = "iid",
                 alpha: float = 0.5, seed: int = 0) -> None:
        if isinstance(source, Mapping):
            from medsec.core.registry import safe_instantiate

            source = safe_instantiate(source, "data.source.source", ("data",))
        if not isinstance(source, DataSource):
            raise ConfigError(f"data.source.source must be a data source, got {type(source).__name__}")
        if not isinstance(num_sites, int) or num_sites < 1:
            raise ConfigError(f"data.source.num_sites must be a positive integer, got {num_sites!r}")
        if not isinstance(site, int) or not 0 <= site < num_sites:
            raise ConfigError(f"data.source.site must be in [0, {num_sites - 1}] (num_sites={num_sites}), got {site!r}")
        if scheme not in SCHEMES:
            raise ConfigError(f"data.source.scheme must be one of {list(SCHEMES)}, got '{scheme}'")
        if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"data.source.alpha must be a positive number, got {alpha!r}")
        self.source, self.num_sites, self.site = source, num_sites, site
        self.scheme, self.alpha, self.seed = scheme, float(alpha), int(seed)

    @property
    def dataset_id(self) -> str:
        identity = {"source": self.source.dataset_id, "num_sites": self.num_sites, "site": self.site,
                    "scheme": self.scheme, "alpha": self.alpha, "seed": self.seed}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"partition-{digest[:12]}"

    def load(self) -> SourceData:
        data = self.source.load()
        splits = dict(data.splits)
        for split, indices in self.assign(data).items():
            records = data.splits[split]
            splits[split] = [records[i] for i in sorted(indices[self.site])]
        info = {**data.info, "partition": {"num_sites": self.num_sites, "site": self.site, "scheme": self.scheme,
                                           "alpha": self.alpha, "seed": self.seed}}
        return SourceData(splits=splits, class_names=data.class_names, multilabel=data.multilabel,
                          spatial_dims=data.spatial_dims, from_files=data.from_files, info=info,
                          reader=data.reader)

    def assign(self, data: SourceData) -> dict[str, list[list[int]]]:
        """Record indices of every site, per partitioned split (``train``, ``val``)."""
        rng = np.random.default_rng(self.seed)
        grouped = {split: _groups(data.splits[split]) for split in PARTITIONED}
        for _ in range(MAX_DRAWS):
            shares = self._shares(data, rng)
            sites = {split: self._split(data.splits[split], grouped[split], shares, rng) for split in PARTITIONED}
            if all(len(members) for split in PARTITIONED for members in sites[split]):
                return sites
            if self.scheme == "iid":
                break
        groups = {split: len(grouped[split]) for split in PARTITIONED}
        raise ConfigError(f"data.source: scheme={self.scheme} (alpha={self.alpha}) leaves a site without training "
                          f"or validation records for num_sites={self.num_sites} (patient groups per split: "
                          f"{groups}); use fewer sites or a larger alpha")

    def _shares(self, data: SourceData, rng: np.random.Generator) -> np.ndarray | None:
        """Site shares: per class (``dirichlet``: classes x sites), of all records (``quantity``)."""
        if self.scheme == "iid":
            return None
        if self.scheme == "quantity":
            return rng.dirichlet(np.full(self.num_sites, self.alpha))
        return rng.dirichlet(np.full(self.num_sites, self.alpha), size=data.num_classes)

    def _split(self, records: list[Record], groups: list[list[int]], shares: np.ndarray | None,
               rng: np.random.Generator) -> list[list[int]]:
        if shares is None:
            return _deal(groups, self.num_sites, rng)
        if shares.ndim == 1:
            return _cut(groups, shares, rng)
        sites: list[list[int]] = [[] for _ in range(self.num_sites)]
        labels = [_label(records, members, "data.source") for members in groups]
        for cls, cls_shares in enumerate(shares):
            for site, members in enumerate(_cut([g for g, y in zip(groups, labels) if y == cls], cls_shares, rng)):
                sites[site].extend(members)
        return sites
