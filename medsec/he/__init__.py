"""Homomorphic (TenSEAL CKKS) inference: the server classifies images it cannot see.

``planner`` derives CKKS parameters from the model, ``compiler`` turns a trained he_cnn into an
:class:`HEProgram`, ``client`` holds the secret key, ``evaluator`` runs the program on the server
with a public context, ``wire`` (de)serialises contexts and ciphertexts and names what is malformed.
"""
from medsec.he.client import HEClient
from medsec.he.compiler import HEProgram, ModelCard, compile_model
from medsec.he.evaluator import MODES, HEServer
from medsec.he.planner import CKKSParams, plan_parameters
from medsec.he.wire import HEInputError, SecretKeyRefused, pack, unpack

__all__ = ["MODES", "CKKSParams", "HEClient", "HEInputError", "HEProgram", "HEServer", "ModelCard", "SecretKeyRefused",
           "compile_model", "pack", "plan_parameters", "unpack"]
