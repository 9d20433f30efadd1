"""LightningModules, one per problem. They know nothing of file formats."""
from medsec.tasks.base import BaseTask
from medsec.tasks.classification import ClassificationTask
from medsec.tasks.compression import CompressionTask
from medsec.tasks.deepkeygen import DeepKeyGenTask
from medsec.tasks.detection import DetectionTask
from medsec.tasks.encipher_gan import EncipherGANTask
from medsec.tasks.gan import GANTask
from medsec.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "CompressionTask", "DeepKeyGenTask", "DetectionTask", "EncipherGANTask", "GANTask", "SegmentationTask"]
