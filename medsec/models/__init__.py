"""Plain ``nn.Module`` networks. Nothing here knows Lightning, Hydra or crypto."""
from medsec.models.classifiers import Classifier, densenet121, resnet, small_cnn
from medsec.models.deepkeygen import KeyGenerator
from medsec.models.denoisers import DenoisingAutoencoder, DnCNN
from medsec.models.encipher_gan import KeyedUNet, PatchCritic
from medsec.models.he_cnn import PolyAct, Square, he_cnn, he_cnn_deep

__all__ = ["Classifier", "DenoisingAutoencoder", "DnCNN", "KeyGenerator", "KeyedUNet", "PatchCritic", "PolyAct", "Square", "densenet121", "he_cnn", "he_cnn_deep", "resnet", "small_cnn"]
