"""LightningModules, one per problem. They know nothing of file formats."""
from medsec.tasks.base import BaseTask
from medsec.tasks.classification import ClassificationTask
from medsec.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "SegmentationTask"]
