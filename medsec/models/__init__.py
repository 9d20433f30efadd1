"""Plain ``nn.Module`` networks. Nothing here knows Lightning, Hydra or crypto."""
from medsec.models.classifiers import Classifier, densenet121, resnet, small_cnn

__all__ = ["Classifier", "densenet121", "resnet", "small_cnn"]
