"""The client side: creates the CKKS context, keeps its secret key, encrypts and decrypts.

Only :meth:`HEClient.public_context` (no secret key) and ciphertexts ever leave the client.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tenseal as ts
from tenseal import sealapi

from medsec.he.compiler import ModelCard
from medsec.he.diagonal import replicate
from medsec.he.wire import ciphertext_to_bytes, context_bytes, load_ciphertext

log = logging.getLogger(__name__)


class HEClient:
    """A hospital-side client for one mode of ``card``'s model."""

    def __init__(self, card: ModelCard, mode: str) -> None:
        self.card, self.mode = card, mode
        params = card.params[mode]
        self.params = params
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                                  coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                                  encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)  # only the client encrypts
        self.context.global_scale = 2.0 ** params.scale_bits
        if mode == "latency":
            self.context.generate_galois_keys()
        log.info("client context: N=%d, chain %s bits, scale 2^%d; the secret key stays in this process",
                 params.poly_modulus_degree, list(params.coeff_mod_bit_sizes), params.scale_bits)

    def public_context(self) -> bytes:
        """The context to send to the server: public, relinearisation and Galois keys only."""
        return context_bytes(self.context)

    def batches(self, count: int) -> list[slice]:
        """How ``count`` images split into requests: a slot per image (throughput), or one image each."""
        step = self.params.slots if self.mode == "throughput" else 1
        return [slice(i, min(i + step, count)) for i in range(0, count, step)]

    def encrypt(self, images: np.ndarray) -> list[bytes]:
        """Ciphertexts of ``images`` ([n, C, H, W] in [0, 1], exactly what the network sees)."""
        if tuple(images.shape[1:]) != self.card.input_shape:
            raise ValueError(f"images are {list(images.shape[1:])}, the model takes {list(self.card.input_shape)}")
        flat = images.reshape(len(images), -1).astype(np.float64)
        vectors = flat.T if self.mode == "throughput" else [replicate(image, self.params.slots) for image in flat]
        return [ciphertext_to_bytes(ts.ckks_vector(self.context, vector.tolist()).ciphertext()[0]) for vector in vectors]

    def decrypt(self, blobs: Sequence[bytes], count: int) -> np.ndarray:
        """Logits [count, classes] from the server's answer to :meth:`encrypt` of ``count`` images."""
        seal_context = self.context.seal_context().data
        decryptor = sealapi.Decryptor(seal_context, self.context.secret_key().data)
        encoder, plain = sealapi.CKKSEncoder(seal_context), sealapi.Plaintext()
        logits = []
        for blob in blobs:
            ciphertext = load_ciphertext(seal_context, blob)
            decryptor.decrypt(ciphertext, plain)
            logits.append(encoder.decode_double(plain))
        if self.mode == "latency":  # one image per answer, its logits in the first slots
            return np.array([values[:self.card.num_classes] for values in logits])
        return np.array([values[:count] for values in logits]).T

