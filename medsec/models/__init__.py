"""Plain ``nn.Module`` networks. Nothing here knows Lightning, Hydra or crypto."""
from medsec.models.classifiers import Classifier, densenet121, resnet, small_cnn
from medsec.models.deepkeygen import KeyGenerator
from medsec.models.denoisers import DenoisingAutoencoder, DnCNN
from medsec.models.encipher_gan import KeyedUNet, PatchCritic
from medsec.models.he_cnn import Square, he_cnn

__all__ = ["Classifier", "DenoisingAutoencoder", "DnCNN", "KeyGenerator", "KeyedUNet", "PatchCritic", "Square", "densenet121", "he_cnn", "resnet", "small_cnn"]
