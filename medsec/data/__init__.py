"""Data sources (read files) and the DataModule (split, transform, batch)."""
from medsec.data.datamodule import MedicalDataModule
from medsec.data.segmentation import segmentation_transforms
from medsec.data.sources.base import DataSource, SourceData

__all__ = ["DataSource", "MedicalDataModule", "SourceData", "segmentation_transforms"]
