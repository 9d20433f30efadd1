"""Protections: key custody, AES-GCM envelopes, encrypted stores and sealed files, perceptual
encryption, secure compressed transmission, adversarial training."""
from medsec.protections.aes_stage import AESStage
from medsec.protections.keys import KeyRef, SecretKey

__all__ = ["AESStage", "KeyRef", "SecretKey"]
