"""Paillier encryption (python-paillier, with gmpy2): encrypted-input inference for the linear part of
a model, and the integer plumbing (fixed point, packing, checked wire format) that Paillier
aggregation (:mod:`medsec.federated.paillier_aggregation`) shares.

Paillier is additively homomorphic: Enc(a) * Enc(b) = Enc(a + b) and Enc(a)^k = Enc(k a) modulo n^2,
for integers modulo the public modulus n. It cannot multiply two ciphertexts, so it evaluates a
linear map on encrypted inputs with plaintext weights: a linear probe (logistic regression) on
features the client computes in the clear, the layout of the Paillier inference papers.

Who holds what, and what the server learns
------------------------------------------
The client makes the key pair (:class:`PaillierClient`), runs the frozen feature extractor itself,
encrypts the feature vector and sends the ciphertexts with its public key (the modulus n). The
server (:class:`PaillierLinear`) holds the head's weights and bias in the clear and the public key
only; it computes the logits under encryption, packs them into as few ciphertexts as fit and
re-randomises them, so the answer reveals the logits to the client and nothing else of the
weights' ciphertext arithmetic. The server learns the number of features, the key size and the
timing of requests, nothing about the features; the client learns the logits (which, queried
often, leak the head, as any prediction service does).

Fixed point and precision
-------------------------
Features x and weights w are integers round(v 2^f) (``frac_bits`` f), the bias round(b 2^2f); the
logit y = sum_j w_j x_j + b is computed exactly as an integer and divided by 2^2f. With rounding
errors |e| <= 1/2 on each encoded value, per logit:

    |y_enc - y| <= 2^-(f+1) (||w||_1 + ||x||_1) + (D/4 + 1/2) 2^-2f

(:func:`linear_error_bound`, D features; it adds float64's own rounding of the reference). Exactness
needs |values| < 2^``VALUE_BITS`` (checked) and the logits to fit their slot, which the server
sizes from its weights and that bound on the features.

Cost (2048-bit key, gmpy2, a core shared with other jobs): he_cnn's head (32 features, 10 classes)
takes 159 ms per image to encrypt on the client (32 encryptions, with the primes), 101 ms on the
server and 6 ms to decrypt; 16.4 kB up, 550 B down (the 10 logits in one ciphertext). small_cnn's
(128 features): 602 ms, 304 ms and 5 ms; 65.6 kB up, 550 B down.

Wire format
-----------
A public key is ``KEY_MAGIC`` + n (big-endian, ceil(bits/8) bytes); a batch of ciphertexts is
``BATCH_MAGIC`` + the key's 16-byte fingerprint (SHA-256 of n) + a 4-byte count + each
ciphertext as a fixed-width big-endian integer of len(n^2) bytes. Every read checks the size before
parsing, the count, the key, and each ciphertext (an integer in [1, n^2) coprime to n); failures
are :class:`~medsec.he.wire.HEInputError` naming the field and index. Neither keys nor plaintexts
ever appear in reprs, logs or errors.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np
import phe
import torch
from phe import PaillierPrivateKey, PaillierPublicKey
from phe.util import HAVE_GMP

from medsec.errors import ConfigError, DataError, SecurityError
from medsec.he.wire import HEInputError

MIN_KEY_BITS, MAX_KEY_BITS, DEFAULT_KEY_BITS = 1024, 4096, 2048
"""Modulus sizes; 2048 bits give about 112-bit security (as RSA-2048), 3072 bits 128-bit. 1024 is
for tests only."""
DEFAULT_FRAC_BITS = 24
"""Fractional bits of the fixed point: a logit's error is about 3e-8 (||w||_1 + ||x||_1)."""
VALUE_BITS = 20
"""Encoded features and weights must be below 2^20 in magnitude."""
MAX_FEATURES = 1 << 16
MAX_CLASSES = 1 << 12
KEY_MAGIC = b"MEDSEC-PAILLIER-PK/1\n"
BATCH_MAGIC = b"MEDSEC-PAILLIER/1\n"
FINGERPRINT_BYTES = 16
_COUNT = struct.Struct(">I")
SITE_KEY_FORMAT = "medsec.paillier-key/1"


def check_key_bits(bits: Any, field: str = "paillier.key_bits") -> int:
    """``bits`` if an integer in [MIN_KEY_BITS, MAX_KEY_BITS], else a ConfigError naming ``field``."""
    if type(bits) is not int or not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
        raise ConfigError(f"{field} must be an integer from {MIN_KEY_BITS} to {MAX_KEY_BITS}, got {str(bits)[:40]}")
    return bits


def check_frac_bits(frac_bits: Any, field: str = "paillier.frac_bits") -> int:
    if type(frac_bits) is not int or not 1 <= frac_bits <= 52:
        raise ConfigError(f"{field} must be an integer from 1 to 52, got {str(frac_bits)[:40]}")
    return frac_bits


def generate_keypair(bits: int = DEFAULT_KEY_BITS) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """A new Paillier key pair with a modulus of exactly ``bits`` bits (gmpy2 if installed)."""
    return phe.generate_paillier_keypair(n_length=check_key_bits(bits))


def uses_gmpy2() -> bool:
    """Whether python-paillier's arithmetic runs on gmpy2 (tens of times faster than pure Python)."""
    return bool(HAVE_GMP)


# --- fixed point and packing -------------------------------------------------------------------

def encode(values: np.ndarray, frac_bits: int, field: str, value_bits: int = VALUE_BITS) -> list[int]:
    """round(v 2^frac_bits) of each value (flattened) as Python integers; non-finite values or
    |v| >= 2^value_bits are refused naming ``field`` and the index."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    bad = np.flatnonzero(~(np.abs(flat) < 2.0 ** value_bits))  # also NaN
    if bad.size:
        raise DataError(f"{field}[{bad[0]}]: must be finite and below 2^{value_bits} in magnitude")
    return [int(v) for v in np.rint(np.ldexp(flat, frac_bits))]


def pack(digits: Sequence[int], slot_bits: int) -> int:
    """sum_k digits[k] 2^(k slot_bits): signed digits, each below 2^(slot_bits-1) in magnitude."""
    value = 0
    for digit in reversed(digits):
        value = (value << slot_bits) + digit
    return value


def unpack(value: int, count: int, slot_bits: int, field: str) -> list[int]:
    """The ``count`` signed digits :func:`pack` put in ``value``; an error naming ``field`` when
    something is left over (a slot overflowed)."""
    size, mask, half = 1 << slot_bits, (1 << slot_bits) - 1, 1 << (slot_bits - 1)
    out = []
    for _ in range(count):
        digit = value & mask
        digit -= size if digit >= half else 0
        out.append(digit)
        value = (value - digit) >> slot_bits
    if value:
        raise DataError(f"{field}: the decrypted value overflows its {count} slots of {slot_bits} bits")
    return out


def slots_per_ciphertext(key: PaillierPublicKey, slot_bits: int) -> int:
    """How many signed ``slot_bits`` slots one plaintext holds: their packed value stays below n/2."""
    return (key.n.bit_length() - 1) // slot_bits


# --- encryption --------------------------------------------------------------------------------

def _obfuscator(key: PaillierPublicKey) -> Any:
    """r^n mod n^2 for a fresh random r: what the public key alone can compute."""
    return gmpy2.powmod(secrets.randbelow(key.n - 1) + 1, key.n, key.nsquare)


def _obfuscators(private: PaillierPrivateKey, count: int) -> list[Any]:
    """``count`` values distributed as r^n mod n^2 for uniform r, made with the primes (4x faster).
    Modulo p^2, r^n = (r^p)^q and s -> s^p maps Z_p* onto the subgroup of order p - 1, on which
    raising to q (coprime to p - 1) is a bijection: s^p mod p^2 for uniform s has the same
    distribution. Likewise modulo q^2; the Chinese remainder theorem joins the two."""
    p, q, p2, q2 = private.p, private.q, private.psquare, private.qsquare
    q2_inverse = gmpy2.invert(q2, p2)
    out = []
    for _ in range(count):
        a = gmpy2.powmod(secrets.randbelow(p - 1) + 1, p, p2)
        b = gmpy2.powmod(secrets.randbelow(q - 1) + 1, q, q2)
        out.append(b + q2 * ((a - b) * q2_inverse % p2))
    return out


def encrypt(key: PaillierPublicKey, values: Sequence[int], private: PaillierPrivateKey | None = None) -> list[int]:
    """Enc(m) = (1 + m n) r^n mod n^2 of each signed integer (|m| < n/2; negatives are n - |m|);
    faster with the ``private`` key (:func:`_obfuscators`)."""
    n, nsquare = key.n, key.nsquare
    for index, m in enumerate(values):
        if abs(m) >= n // 2:
            raise DataError(f"plaintext[{index}]: does not fit the key's modulus")
    masks = _obfuscators(private, len(values)) if private is not None else [_obfuscator(key) for _ in values]
    return [int((1 + (m % n) * n) * mask % nsquare) for m, mask in zip(values, masks)]


def rerandomize(key: PaillierPublicKey, ciphertext: Any) -> int:
    """The same plaintext under fresh randomness."""
    return int(ciphertext * _obfuscator(key) % key.nsquare)


def decrypt(private: PaillierPrivateKey, ciphertexts: Sequence[int]) -> list[int]:
    """The signed integers (centred modulo n) the ciphertexts hold."""
    n = private.public_key.n
    out = []
    for c in ciphertexts:
        m = private.raw_decrypt(c)
        out.append(m - n if m > n // 2 else m)
    return out


def decrypt_packed(private: PaillierPrivateKey, ciphertexts: Sequence[int], count: int, slot_bits: int,
                   field: str) -> list[int]:
    """The ``count`` signed digits packed, as many as fit, in each of ``ciphertexts`` in turn."""
    per, digits = slots_per_ciphertext(private.public_key, slot_bits), []
    for index, value in enumerate(decrypt(private, ciphertexts)):
        digits += unpack(value, min(per, count - len(digits)), slot_bits, f"{field}[{index}]")
    return digits


def add(key: PaillierPublicKey, left: Sequence[int], right: Sequence[int]) -> list[int]:
    """Element-wise Enc(a + b) of two lists of ciphertexts."""
    nsquare = gmpy2.mpz(key.nsquare)
    return [int(gmpy2.mpz(a) * b % nsquare) for a, b in zip(left, right)]


# --- wire format -------------------------------------------------------------------------------

def public_key_bytes(key: PaillierPublicKey) -> bytes:
    """``KEY_MAGIC`` + the modulus n: all the server gets."""
    if isinstance(key, PaillierPrivateKey):
        raise SecurityError("public_key_bytes takes the public key; a private key never leaves its owner")
    return KEY_MAGIC + key.n.to_bytes((key.n.bit_length() + 7) // 8, "big")


def load_public_key(data: Any, field: str = "public_key") -> PaillierPublicKey:
    """A public key from :func:`public_key_bytes`: an odd modulus of MIN_KEY_BITS to MAX_KEY_BITS bits."""
    if not isinstance(data, bytes):
        raise HEInputError(field, f"must be the bytes of public_key_bytes, got {type(data).__name__}")
    if not data.startswith(KEY_MAGIC):
        raise HEInputError(field, f"not a medsec Paillier public key (expected it to start with {KEY_MAGIC!r})")
    body = data[len(KEY_MAGIC):]
    if not MIN_KEY_BITS // 8 <= len(body) <= MAX_KEY_BITS // 8:
        raise HEInputError(field, f"a modulus of {len(body)} bytes; {MIN_KEY_BITS // 8} to {MAX_KEY_BITS // 8} "
                                  "are accepted")
    n = int.from_bytes(body, "big")
    if n.bit_length() < MIN_KEY_BITS or n % 2 == 0:
        raise HEInputError(field, f"the modulus must be odd and at least {MIN_KEY_BITS} bits")
    return PaillierPublicKey(n)


def fingerprint(key: PaillierPublicKey) -> bytes:
    """SHA-256 of the modulus, cut to ``FINGERPRINT_BYTES``: which key a batch is encrypted under."""
    return hashlib.sha256(public_key_bytes(key)).digest()[:FINGERPRINT_BYTES]


def _width(key: PaillierPublicKey) -> int:
    return (key.nsquare.bit_length() + 7) // 8


def ciphertexts_to_bytes(key: PaillierPublicKey, ciphertexts: Sequence[int]) -> bytes:
    """``BATCH_MAGIC``, the key's fingerprint, the count and fixed-width ciphertexts."""
    width = _width(key)
    return b"".join([BATCH_MAGIC, fingerprint(key), _COUNT.pack(len(ciphertexts)),
                     *(int(c).to_bytes(width, "big") for c in ciphertexts)])


def check_ciphertext(key: PaillierPublicKey, value: Any, field: str) -> int:
    """``value`` if a valid ciphertext for ``key``: an integer in [1, n^2) coprime to n."""
    if type(value) is not int:
        raise HEInputError(field, f"not an integer ({type(value).__name__})")
    if not 1 <= value < key.nsquare:
        raise HEInputError(field, "outside [1, n^2) for the public key's modulus n")
    if gmpy2.gcd(value, key.n) != 1:
        raise HEInputError(field, "not coprime to the modulus n (not a ciphertext)")
    return value


def load_ciphertexts(key: PaillierPublicKey, data: bytes | Sequence[Any], count: int, field: str) -> list[int]:
    """``count`` checked ciphertexts from a :func:`ciphertexts_to_bytes` batch or a list of integers;
    errors name ``field`` (and the index)."""
    if isinstance(data, (bytes, bytearray)):
        data = _split_batch(key, bytes(data), count, field)
    elif not isinstance(data, Sequence) or isinstance(data, str):
        raise HEInputError(field, f"must be a batch of ciphertexts (bytes) or a list of integers, got "
                                  f"{type(data).__name__}")
    if len(data) != count:
        raise HEInputError(field, f"{len(data)} ciphertexts, expected {count}")
    return [check_ciphertext(key, value, f"{field}[{index}]") for index, value in enumerate(data)]


def _split_batch(key: PaillierPublicKey, data: bytes, count: int, field: str) -> list[int]:
    head = len(BATCH_MAGIC) + FINGERPRINT_BYTES + _COUNT.size
    width = _width(key)
    if len(data) > head + count * width:
        raise HEInputError(field, f"{len(data)} bytes, more than the {head + count * width} that {count} "
                                  f"ciphertexts take under this key")
    if not data.startswith(BATCH_MAGIC) or len(data) < head:
        raise HEInputError(field, f"not a medsec Paillier batch (expected it to start with {BATCH_MAGIC!r})")
    if data[len(BATCH_MAGIC):head - _COUNT.size] != fingerprint(key):
        raise HEInputError(field, "encrypted under another public key (its key fingerprint differs)")
    (declared,) = _COUNT.unpack_from(data, head - _COUNT.size)
    if declared != count:
        raise HEInputError(field, f"{declared} ciphertexts, expected {count}")
    if len(data) != head + count * width:
        raise HEInputError(field, f"truncated: {len(data) - head} bytes of ciphertexts, {count} take "
                                  f"{count * width} under this key")
    return [int.from_bytes(data[at:at + width], "big") for at in range(head, len(data), width)]


# --- site key files (shared by the sites of a federation) --------------------------------------

def private_key_bytes(private: PaillierPrivateKey) -> bytes:
    """The private key's primes as JSON, for a mode-600 key file (never for the server)."""
    return json.dumps({"format": SITE_KEY_FORMAT, "p": hex(private.p), "q": hex(private.q)}).encode()


def load_private_key(data: bytes, field: str) -> PaillierPrivateKey:
    """A private key from :func:`private_key_bytes`; a ConfigError naming ``field`` (never the key)."""
    try:
        obj = json.loads(data.decode("utf-8"))
        p, q = int(obj["p"], 16), int(obj["q"], 16)
        ok = obj["format"] == SITE_KEY_FORMAT
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(f"{field}: not a medsec Paillier private key file")
    bits = (p * q).bit_length()
    if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS or p == q or min(p, q) < 3:
        raise ConfigError(f"{field}: not a usable Paillier key ({bits}-bit modulus)")
    public = PaillierPublicKey(p * q)
    return PaillierPrivateKey(public, p, q)


# --- encrypted linear layer --------------------------------------------------------------------

@dataclass(frozen=True)
class LinearCard:
    """What the client needs to talk to a :class:`PaillierLinear`: the shapes, the fixed point and
    how the logits are packed (``slot_bits`` each, ``per_ciphertext`` to a ciphertext)."""

    features: int
    classes: int
    frac_bits: int
    slot_bits: int
    per_ciphertext: int

    @property
    def ciphertexts(self) -> int:
        """Ciphertexts in the answer."""
        return -(-self.classes // self.per_ciphertext)


class PaillierClient:
    """Holds a Paillier key pair: encrypts feature vectors and decrypts the logits."""

    def __init__(self, key_bits: int = DEFAULT_KEY_BITS) -> None:
        self._public, self._private = generate_keypair(key_bits)

    def __repr__(self) -> str:
        return f"PaillierClient({self.key_bits}-bit key)"

    @property
    def key_bits(self) -> int:
        return self._public.n.bit_length()

    @property
    def public_key(self) -> bytes:
        """What the server gets (:func:`public_key_bytes`)."""
        return public_key_bytes(self._public)

    def encrypt(self, features: np.ndarray, card: LinearCard) -> bytes:
        """One feature vector, encoded at ``card.frac_bits`` and encrypted, as a batch."""
        if np.size(features) != card.features:
            raise DataError(f"features: {np.size(features)} values, the model takes {card.features}")
        values = encode(features, card.frac_bits, "features")
        return ciphertexts_to_bytes(self._public, encrypt(self._public, values, self._private))

    def decrypt(self, answer: bytes, card: LinearCard) -> np.ndarray:
        """The logits (float64) from the server's answer."""
        ciphertexts = load_ciphertexts(self._public, answer, card.ciphertexts, "logits")
        digits = decrypt_packed(self._private, ciphertexts, card.classes, card.slot_bits, "logits")
        return np.ldexp(np.array([float(d) for d in digits]), -2 * card.frac_bits)


class PaillierLinear:
    """The server: ``weight`` (classes x features) and ``bias`` in the clear, the client's public
    key (bytes of :func:`public_key_bytes`) and nothing else; evaluates encrypted logits."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, public_key: bytes,
                 frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if not isinstance(public_key, bytes):
            raise SecurityError("PaillierLinear takes the client's public key as bytes (public_key_bytes); "
                                "the private key stays with the client")
        weight = np.asarray(weight, dtype=np.float64)
        if weight.ndim != 2 or not 1 <= weight.shape[0] <= MAX_CLASSES or not 1 <= weight.shape[1] <= MAX_FEATURES:
            raise ConfigError(f"weight: shape {weight.shape}, expected (classes <= {MAX_CLASSES}, "
                              f"features <= {MAX_FEATURES})")
        self.public_key = load_public_key(public_key)
        classes, features = weight.shape
        frac_bits = check_frac_bits(frac_bits)
        flat = encode(weight, frac_bits, "weight")
        self._weights = [flat[k * features:(k + 1) * features] for k in range(classes)]
        self._bias = encode(np.broadcast_to(np.asarray(bias, dtype=np.float64), (classes,)), 2 * frac_bits, "bias")
        self.card = self._card(features, classes, frac_bits)

    def __repr__(self) -> str:
        return f"PaillierLinear({self.card.classes}x{self.card.features}, {self.public_key.n.bit_length()}-bit key)"

    def _card(self, features: int, classes: int, frac_bits: int) -> LinearCard:
        """Slots wide enough for any logit of features below 2^VALUE_BITS."""
        x_max = 1 << (VALUE_BITS + frac_bits)
        bound = max(sum(map(abs, w)) * x_max + abs(b) for w, b in zip(self._weights, self._bias))
        slot_bits = bound.bit_length() + 1
        per = slots_per_ciphertext(self.public_key, slot_bits)
        if per < 1:
            raise ConfigError(f"paillier.frac_bits={frac_bits}: a logit takes {slot_bits} bits, more than the "
                              f"{self.public_key.n.bit_length()}-bit key holds")
        return LinearCard(features, classes, frac_bits, slot_bits, per)

    def evaluate(self, request: bytes | Sequence[Any]) -> bytes:
        """Encrypted, packed and re-randomised logits for one encrypted feature vector."""
        key = self.public_key
        xs = [gmpy2.mpz(c) for c in load_ciphertexts(key, request, self.card.features, "features")]
        return ciphertexts_to_bytes(key, [rerandomize(key, c) for c in self._pack(self._logits(xs))])

    def _logits(self, xs: list[Any]) -> list[Any]:
        """Enc(sum_j w_kj x_j + b_k) for each class k: Enc(x_j)^w_kj, through the inverse for w < 0."""
        n, nsquare = self.public_key.n, gmpy2.mpz(self.public_key.nsquare)
        inverses: dict[int, Any] = {}
        logits = []
        for weights, bias in zip(self._weights, self._bias):
            c = gmpy2.mpz(1 + (bias % n) * n)  # Enc(b) without randomness: re-randomised after packing
            for j, w in enumerate(weights):
                if w < 0 and j not in inverses:
                    inverses[j] = gmpy2.invert(xs[j], nsquare)
                if w:
                    c = c * gmpy2.powmod(xs[j] if w > 0 else inverses[j], abs(w), nsquare) % nsquare
            logits.append(c)
        return logits

    def _pack(self, logits: list[Any]) -> list[Any]:
        """``per_ciphertext`` logits to a ciphertext, by Horner's rule: c <- c^(2^slot_bits) Enc(y_k)."""
        nsquare, per, shift = gmpy2.mpz(self.public_key.nsquare), self.card.per_ciphertext, 1 << self.card.slot_bits
        packed = []
        for start in range(0, len(logits), per):
            c = gmpy2.mpz(1)
            for logit in reversed(logits[start:start + per]):
                c = gmpy2.powmod(c, shift, nsquare) * logit % nsquare
            packed.append(c)
        return packed


def linear_error_bound(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, frac_bits: int) -> np.ndarray:
    """Per-logit bound on |encrypted - float64 plain| for ``features`` (images x D): the fixed point's
    2^-(f+1) (||w||_1 + ||x||_1) + (D/4 + 1/2) 2^-2f, plus float64's (D + 2) 2^-53 (|w| |x| + |b|)."""
    w, x = np.abs(np.asarray(weight, np.float64)), np.abs(np.asarray(features, np.float64))
    b = np.abs(np.asarray(bias, np.float64))
    d = w.shape[1]
    fixed = 2.0 ** -(frac_bits + 1) * (w.sum(1)[None, :] + x.sum(1)[:, None]) + (d / 4 + 0.5) * 2.0 ** (-2 * frac_bits)
    return fixed + (d + 2) * 2.0 ** -53 * (x @ w.T + b[None, :])


# --- the encrypted probe of a classifier -------------------------------------------------------

def head_weights(net: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``net.head``'s weight and bias in float64 (a zero bias when it has none)."""
    weight = net.head.weight.detach().double().cpu().numpy()
    bias = net.head.bias.detach().double().cpu().numpy() if net.head.bias is not None else np.zeros(len(weight))
    return weight, bias


def encrypted_probe(net: torch.nn.Module, key_bits: int = DEFAULT_KEY_BITS,
                    frac_bits: int = DEFAULT_FRAC_BITS) -> tuple[PaillierClient, PaillierLinear]:
    """A client with a fresh key pair and a server holding ``net.head`` (a Linear layer) with the
    client's public key; the client runs ``net.features`` (the backbone) itself."""
    head = getattr(net, "head", None)
    if not isinstance(head, torch.nn.Linear) or not hasattr(net, "features"):
        raise ConfigError(f"scheme=paillier evaluates a linear head on plain features: the model must be a "
                          f"Classifier with a Linear head, got {type(net).__name__}")
    client = PaillierClient(key_bits)
    return client, PaillierLinear(*head_weights(net), client.public_key, frac_bits)


def _encrypted_logits(client: PaillierClient, server: PaillierLinear,
                      features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each feature vector through encrypt, evaluate and decrypt: the logits, the seconds each step
    took and the bytes each way, summed over the vectors."""
    card, seconds, sizes, logits = server.card, np.zeros(3), np.zeros(2), []
    for x in features:
        t0 = time.perf_counter()
        request = client.encrypt(x, card)
        t1 = time.perf_counter()
        answer = server.evaluate(request)
        t2 = time.perf_counter()
        logits.append(client.decrypt(answer, card))
        seconds += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        sizes += (len(request), len(answer))
    return np.stack(logits) if logits else np.zeros((0, card.classes)), seconds, sizes


@torch.no_grad()
def paillier_probe(net: torch.nn.Module, images: torch.Tensor, key_bits: int = DEFAULT_KEY_BITS,
                   frac_bits: int = DEFAULT_FRAC_BITS) -> tuple[np.ndarray, dict[str, Any]]:
    """Logits (images x classes, float64) of ``net`` (put in eval mode) on ``images`` with the head
    evaluated under Paillier encryption, and a report: timings per image (client feature
    extraction, encryption, server evaluation, decryption), bytes each way, and the error against
    the float64 head with its bound (:func:`linear_error_bound`) and against the float32 model."""
    start = time.perf_counter()
    client, server = encrypted_probe(net, key_bits, frac_bits)
    keygen = time.perf_counter() - start
    net.eval()
    start = time.perf_counter()
    embedded = net.features(images).flatten(1)
    extract = time.perf_counter() - start
    features, plain = embedded.double().cpu().numpy(), net.head(embedded).double().cpu().numpy()
    logits, seconds, sizes = _encrypted_logits(client, server, features)
    weight, bias = head_weights(net)
    error = np.abs(logits - (features @ weight.T + bias))
    bound = linear_error_bound(weight, bias, features, frac_bits)
    card, count = server.card, max(len(features), 1)
    ms = [float(1e3 * value / count) for value in (extract, *seconds)]
    report = {
        "scheme": "paillier", "key_bits": client.key_bits, "frac_bits": frac_bits, "gmpy2": uses_gmpy2(),
        "images": len(features), "features": card.features, "classes": card.classes,
        "slot_bits": card.slot_bits, "logits_per_ciphertext": card.per_ciphertext, "keygen_s": keygen,
        **dict(zip(("features_ms_per_image", "encrypt_ms_per_image", "server_ms_per_image",
                    "decrypt_ms_per_image"), ms)),
        "request_bytes_per_image": float(sizes[0] / count), "response_bytes_per_image": float(sizes[1] / count),
        "max_abs_error": float(error.max(initial=0.0)), "max_error_bound": float(bound.max(initial=0.0)),
        "within_bound": bool(np.all(error <= bound)),
        "max_abs_diff_vs_float32_head": float(np.abs(logits - plain).max(initial=0.0)),
    }
    return logits, report
