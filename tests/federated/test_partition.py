"""PartitionSource: every site's share of the training and validation records, patient-disjoint,
with the label or size skew its scheme promises; the test split stays whole."""
from __future__ import annotations

import numpy as np
import pytest

from medsec.data.datamodule import build_datamodule
from medsec.data.sources.base import DataSource, SourceData
from medsec.data.sources.partition import PartitionSource
from medsec.data.sources.synthetic import SyntheticSource
from medsec.errors import ConfigError

SITES = 3


def synthetic() -> SyntheticSource:
    return SyntheticSource(num_samples=(300, 60, 30), image_size=12, num_classes=4)


def shares(source: DataSource, scheme: str, alpha: float = 0.5, sites: int = SITES) -> list[SourceData]:
    return [PartitionSource(source, sites, site, scheme=scheme, alpha=alpha, seed=1).load() for site in range(sites)]


def label_skew(parts: list[SourceData], num_classes: int) -> float:
    """Mean total-variation distance between each site's training label distribution and the whole's."""
    counts = np.asarray([np.bincount([r["label"] for r in p.splits["train"]], minlength=num_classes) for p in parts])
    whole = counts.sum(0) / counts.sum()
    return float(np.mean([0.5 * np.abs(c / c.sum() - whole).sum() for c in counts]))


class Patients(DataSource):
    """60 training records of 20 patients (3 each), 30 validation records of 10, 6 test records."""

    def load(self) -> SourceData:
        def records(split: str, patients: int) -> list[dict]:
            return [{"image": np.zeros((1, 4, 4), np.float32), "label": p % 2, "patient": f"{split}-{p}",
                     "id": f"{split}-{p}-{k}"} for p in range(patients) for k in range(3)]

        return SourceData({"train": records("train", 20), "val": records("val", 10), "test": records("test", 2)},
                          class_names=["a", "b"])


def test_iid_shares_are_equal_disjoint_and_complete_and_test_stays_whole() -> None:
    source = synthetic()
    whole = source.load()
    parts = shares(source, "iid")
    for split in ("train", "val"):
        ids = [[r["id"] for r in p.splits[split]] for p in parts]
        assert [len(i) for i in ids] == [len(whole.splits[split]) // SITES] * SITES  # 100 and 20 each
        assert sorted(i for site in ids for i in site) == sorted(r["id"] for r in whole.splits[split])
    assert all([r["id"] for r in p.splits["test"]] == [r["id"] for r in whole.splits["test"]] for p in parts)
    assert label_skew(parts, 4) < 0.1  # measured 0.073: the sampling noise of 100 records per site


def test_dirichlet_skews_the_labels_and_quantity_the_sizes() -> None:
    source = synthetic()
    skewed, mild = label_skew(shares(source, "dirichlet", 0.1), 4), label_skew(shares(source, "dirichlet", 100.0), 4)
    assert skewed > 0.5 and mild < 0.05, (skewed, mild)  # measured 0.65 and 0.010
    sizes = [len(p.splits["train"]) for p in shares(source, "quantity", 0.3)]
    assert sum(sizes) == 300 and max(sizes) > 10 * min(sizes), sizes  # measured [15, 277, 8]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_a_patient_never_spans_two_sites(scheme: str) -> None:
    parts = shares(Patients(), scheme, alpha=1.0)
    for split in ("train", "val"):
        owners: dict[str, set[int]] = {}
        for site, part in enumerate(parts):
            for record in part.splits[split]:
                owners.setdefault(record["patient"], set()).add(site)
        assert all(len(sites) == 1 for sites in owners.values())
        assert all(len(part.splits[split]) % 3 == 0 for part in parts)  # whole patients only


def test_built_from_a_data_config_with_a_stable_id_per_site() -> None:
    config = {"_target_": "medsec.data.MedicalDataModule", "num_workers": 0, "batch_size": 8,
              "source": {"_target_": "medsec.data.sources.partition.PartitionSource", "num_sites": 2, "site": 1,
                         "source": {"_target_": "medsec.data.sources.synthetic.SyntheticSource",
                                    "num_samples": [40, 10, 10], "image_size": 12}}}
    datamodule = build_datamodule(config)
    assert len(datamodule.data.splits["train"]) == 20 and len(datamodule.data.splits["test"]) == 10
    assert datamodule.data.info["partition"]["site"] == 1
    source = datamodule.source
    assert source.dataset_id == PartitionSource(source.source, 2, 1).dataset_id != PartitionSource(source.source, 2, 0).dataset_id


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_sites": 3, "site": 3}, "data.source.site"),
    ({"num_sites": 0, "site": 0}, "data.source.num_sites"),
    ({"num_sites": 2, "site": 0, "scheme": "stratified"}, "data.source.scheme"),
    ({"num_sites": 2, "site": 0, "scheme": "dirichlet", "alpha": 0.0}, "data.source.alpha"),
    ({"num_sites": 40, "site": 0}, "leaves a site without"),
])
def test_bad_settings_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PartitionSource(SyntheticSource(num_samples=(60, 20, 10), image_size=12), **kwargs).load()


def test_dirichlet_needs_one_label_per_record() -> None:
    source = SyntheticSource(num_samples=(30, 10, 10), image_size=12, num_classes=2, multilabel=True)
    with pytest.raises(ConfigError, match="multi-class"):
        PartitionSource(source, 2, 0, scheme="dirichlet").load()
