"""One module per data source; each turns files (or a seed) into split records."""
from medsec.data.sources.base import DataSource, SourceData, split_by_group
from medsec.data.sources.chestxray14 import FINDINGS, ChestXray14Source
from medsec.data.sources.decathlon import DecathlonSource
from medsec.data.sources.folder import FolderSource
from medsec.data.sources.medmnist import MedMNISTSource

__all__ = [
    "FINDINGS",
    "ChestXray14Source",
    "DataSource",
    "DecathlonSource",
    "FolderSource",
    "MedMNISTSource",
    "SourceData",
    "split_by_group",
]
