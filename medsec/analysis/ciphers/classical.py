"""Image ciphers behind one small interface, so the security report treats them alike.

Every cipher encrypts a stack of 8-bit grey images ``(N, H, W)`` into cipher images of the same
shape under a secret ``key`` (bytes), decrypts them, makes keys and flips one key bit. Two
classical baselines live here: AES-CTR (the reference an ideal cipher should match) and a
logistic-map permutation-diffusion cipher; the learned ciphers (DeepKeyGen, EncipherGAN) adapt
their trained networks to the same interface in :mod:`medsec.tasks`.
"""
from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from medsec.analysis.ciphers.statistics import as_stack
from medsec.errors import ConfigError

NONCE_BYTES = 16


@dataclass
class Ciphertext:
    """Cipher images ``(N, H, W)`` uint8, plus the public per-image nonces of nonce-based ciphers."""

    images: np.ndarray
    nonces: list[bytes] | None = None


class ImageCipher(ABC):
    """The interface of every image cipher. ``key`` is secret material, never logged or stored."""

    name: str = "cipher"
    key_bytes: int = 32
    lossless: bool = True
    """Whether decryption returns the plaintext exactly (learned ciphers only approximate it)."""

    def keygen(self) -> bytes:
        """A fresh random key from the operating system's CSPRNG."""
        return secrets.token_bytes(self.key_bytes)

    @staticmethod
    def flip_key_bit(key: bytes, bit: int) -> bytes:
        """``key`` with bit ``bit`` (0 = least significant bit of the first byte) inverted."""
        if not 0 <= bit < 8 * len(key):
            raise ValueError(f"bit {bit} is outside a {8 * len(key)}-bit key")
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)

    def check_key(self, key: bytes) -> bytes:
        if len(key) != self.key_bytes:
            raise ConfigError(f"{self.name}: the key must be {self.key_bytes} bytes, got {len(key)}")
        return key

    @abstractmethod
    def encrypt(self, images: np.ndarray, key: bytes, nonces: list[bytes] | None = None) -> Ciphertext:
        """Encrypt ``images``; nonce-based ciphers draw fresh nonces unless ``nonces`` are given
        (reusing nonces is for measurements only)."""

    @abstractmethod
    def decrypt(self, ciphertext: Ciphertext, key: bytes) -> np.ndarray:
        """The plain images of ``ciphertext``."""


class AESCTRCipher(ImageCipher):
    """AES in counter mode (``cryptography``), a fresh random 128-bit initial counter per image.

    The reference an ideal image cipher should match. Like every stream cipher it changes only
    the pixels that change in the plaintext when a nonce is reused; with fresh nonces (as it must
    be used) its cipher images are independent of each other.
    """

    name = "aes_ctr"

    def __init__(self, bits: int = 256) -> None:
        if bits not in (128, 256):
            raise ConfigError(f"cipher.bits must be 128 or 256, got {bits}")
        self.key_bytes = bits // 8

    def _apply(self, images: np.ndarray, key: bytes, nonces: list[bytes]) -> np.ndarray:
        out = np.empty_like(images)
        for i, (image, nonce) in enumerate(zip(images, nonces)):
            stream = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
            out[i] = np.frombuffer(stream.update(image.tobytes()), dtype=np.uint8).reshape(image.shape)
        return out

    def encrypt(self, images: np.ndarray, key: bytes, nonces: list[bytes] | None = None) -> Ciphertext:
        stack = as_stack(images)
        nonces = nonces or [secrets.token_bytes(NONCE_BYTES) for _ in range(len(stack))]
        return Ciphertext(self._apply(stack, self.check_key(key), nonces), list(nonces))

    def decrypt(self, ciphertext: Ciphertext, key: bytes) -> np.ndarray:
        if ciphertext.nonces is None:
            raise ConfigError("aes_ctr: the ciphertext carries no nonces")
        return self._apply(as_stack(ciphertext.images), self.check_key(key), ciphertext.nonces)


@lru_cache(maxsize=8)
def logistic_sequence(key: bytes, length: int, r: float, lanes: int, transient: int) -> np.ndarray:
    """``length`` values of ``lanes`` logistic maps ``x <- r x (1 - x)`` run side by side, after
    ``transient`` discarded steps; each lane starts from SHAKE-256 of the key, so every key bit
    moves every starting point."""
    seeds = np.frombuffer(hashlib.shake_256(b"medsec/chaotic/" + key).digest(8 * lanes), dtype=np.uint64)
    x = 0.01 + 0.98 * (seeds >> np.uint64(11)).astype(np.float64) / 2.0**53
    for _ in range(transient):
        x = r * x * (1 - x)
    steps = -(-length // lanes)
    out = np.empty((steps, lanes))
    for t in range(steps):
        x = r * x * (1 - x)
        out[t] = x
    return out.ravel()[:length]


class ChaoticCipher(ImageCipher):
    """A logistic-map permutation-diffusion image cipher (the classical chaotic design).

    Each of ``rounds`` rounds permutes the pixels (the order of a chaotic sequence), XORs them
    with a chaotic keystream (``floor(x 2^40) mod 256``), and diffuses with chained modular
    addition forwards then backwards (``c_i = c_{i-1} + v_i mod 256``, a prefix sum), so that one
    changed pixel changes every cipher pixel. Deterministic: the same image and key give the
    same cipher image.
    """

    name = "chaotic"

    def __init__(self, rounds: int = 2, r: float = 3.99, lanes: int = 256, transient: int = 1000) -> None:
        if rounds < 1:
            raise ConfigError(f"cipher.rounds must be at least 1, got {rounds}")
        if not 3.57 < r <= 4.0:
            raise ConfigError(f"cipher.r must be in the chaotic range (3.57, 4], got {r}")
        self.rounds, self.r, self.lanes, self.transient = rounds, r, lanes, transient

    def _schedule(self, key: bytes, pixels: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per round: (permutation, keystream)."""
        seq = logistic_sequence(self.check_key(key), 2 * self.rounds * pixels, self.r, self.lanes, self.transient)
        rounds = seq.reshape(self.rounds, 2, pixels)
        return [(np.argsort(order, kind="stable"), (stream * 2.0**40).astype(np.int64) & 255)
                for order, stream in rounds]

    def encrypt(self, images: np.ndarray, key: bytes, nonces: list[bytes] | None = None) -> Ciphertext:
        stack = as_stack(images)
        flat = stack.reshape(len(stack), -1).astype(np.int64)
        for perm, stream in self._schedule(key, flat.shape[1]):
            flat = np.cumsum(flat[:, perm] ^ stream, axis=1) & 255
            flat = np.cumsum(flat[:, ::-1], axis=1)[:, ::-1] & 255
        return Ciphertext(flat.astype(np.uint8).reshape(stack.shape))

    def decrypt(self, ciphertext: Ciphertext, key: bytes) -> np.ndarray:
        stack = as_stack(ciphertext.images)
        flat = stack.reshape(len(stack), -1).astype(np.int64)
        for perm, stream in reversed(self._schedule(key, flat.shape[1])):
            flat = np.diff(flat[:, ::-1], axis=1, prepend=0)[:, ::-1] & 255
            flat = (np.diff(flat, axis=1, prepend=0) & 255) ^ stream
            unpermuted = np.empty_like(flat)
            unpermuted[:, perm] = flat
            flat = unpermuted
        return flat.astype(np.uint8).reshape(stack.shape)
