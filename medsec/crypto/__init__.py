"""Security stages: AES-GCM envelopes and stores, key custody."""
from medsec.crypto.keys import KeyRef, SecretKey
from medsec.crypto.stage import AESStage

__all__ = ["AESStage", "KeyRef", "SecretKey"]
