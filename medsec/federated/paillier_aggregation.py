"""Paillier-encrypted aggregation for federated training: the server multiplies the sites' Paillier
ciphertexts (adding the plaintexts) and never sees one site's update in the clear.

Who holds the private key, and what that implies
------------------------------------------------
- **The sites** share one Paillier private key (the primes p, q). One site (or a key ceremony run
  for them) calls :func:`make_site_key`, which writes it to a new file readable by its owner only
  (mode 600, never overwritten); it reaches the other sites over a channel the server does not see,
  and each loads it with :func:`load_site_key` (a regular file of the current user, mode 600/400).
- **The server** gets :func:`public_key` only (the modulus n). :class:`PaillierAggregation` refuses
  a private key.

So the server learns nothing about the values: it sees ciphertexts, their number, the model's
shapes and dtypes (plain header) and each site's example count n_i (plain). Every site sees the
aggregate (the next global model) and, holding the shared key, could decrypt any other site's
update given its ciphertexts: one shared key protects against a curious server, not against a site
colluding with it (threshold Paillier would; not done). Integrity is not protected: the server can
replace the aggregate, and a site can send any update (values that overflow their slot corrupt
the neighbouring slot; only an overflow past the last slot of a ciphertext is detected).

Protocol, packing and precision
-------------------------------
As :mod:`~medsec.federated.he_aggregation`, sharing :mod:`~medsec.federated.encrypted_sum`: site i
sends n_i round(w 2^``FRAC_BITS``) for each parameter w, with |w| < 2^``VALUE_BITS``, and the server
adds the ciphertexts and the n_i. The integers are packed ``SLOT_BITS`` (81) bits apiece as signed
digits, as many as fit below n/2 (25 to a 2048-bit key), so one encryption carries 25 parameters;
a slot holds any sum of N = sum n_i < 2^``EXAMPLES_BITS`` examples (the server refuses more), so
sums never carry into the next slot. The sites divide the decrypted sum by N 2^FRAC_BITS: the
average differs from FedAvg's exact weighted mean by at most 2^-(FRAC_BITS+1) = 3e-8 (plus float64
rounding), below float32's resolution for weights of magnitude 1.

Wire format: ``Parameters(tensor_type="medsec.paillier/1", tensors=[header, batch])``, the header as
CKKS's (format ``medsec-paillier/1``), the batch one :func:`~medsec.he.paillier.ciphertexts_to_bytes`
of ceil(values / slots) ciphertexts under the sites' key; every read checks its size, the key's
fingerprint, the count and each ciphertext (an integer in [1, n^2), coprime to n); a failure names
the site, the tensor and the index.

Measured (2048-bit key, small_cnn(2, 1, 2, 8): 9,103 values in 365 ciphertexts of 25 slots, on a
CPU shared with other jobs): an update is 188 kB (4.6x its float32 bytes); encrypting it takes 1.9 s
per site (with the primes: sites hold the private key), decrypting the aggregate 1.8 s, and the
server adds three sites' in 0.06 s (plain FedAvg: 0.02 s). CKKS encrypts 140k values in 0.1 s:
Paillier suits small models and heads, or settings where CKKS is not an option.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.common import Parameters
from flwr.server.strategy import FedAvg
from phe import PaillierPrivateKey, PaillierPublicKey

from medsec.errors import DataError, SecurityError
from medsec.federated.encrypted_sum import (
    EncryptedSum,
    EncryptionMod,
    Header,
    flatten,
    header_and_payload,
    header_of,
)
from medsec.he.paillier import (
    DEFAULT_KEY_BITS,
    SITE_KEY_FORMAT,
    add,
    ciphertexts_to_bytes,
    decrypt_packed,
    encode,
    encrypt,
    generate_keypair,
    load_ciphertexts,
    load_private_key,
    load_public_key,
    pack,
    private_key_bytes,
    public_key_bytes,
    slots_per_ciphertext,
)
from medsec.he.wire import HEInputError
from medsec.protections.keys import read_private_file, write_private_file

PAILLIER_TENSOR_TYPE = "medsec.paillier/1"
"""``Parameters.tensor_type`` of encrypted parameters."""
HEADER_FORMAT = "medsec-paillier/1"
SCHEME = "Paillier"
FRAC_BITS = 24
VALUE_BITS = 24
"""Parameters must be below 2^24 in magnitude (BatchNorm's batch counts included)."""
EXAMPLES_BITS = 32
"""The sites' examples add up to less than 2^32."""
SLOT_BITS = FRAC_BITS + VALUE_BITS + EXAMPLES_BITS + 1
MAX_KEY_FILE_BYTES = 1 << 16


def make_site_key(path: str | Path, key_bits: int = DEFAULT_KEY_BITS) -> PaillierPrivateKey:
    """Key ceremony: a new Paillier key pair, the private key written to ``path`` (a new file, mode
    600, never overwritten) for the sites only. The server gets :func:`public_key`."""
    _, private = generate_keypair(key_bits)
    write_private_file(path, private_key_bytes(private), "Paillier site key")
    return private


def load_site_key(path: str | Path, field: str = "federation.paillier.site_key") -> PaillierPrivateKey:
    """The sites' private key from :func:`make_site_key`'s file."""
    path = Path(path).expanduser()
    data = read_private_file(path, field, "Paillier site key", MAX_KEY_FILE_BYTES,
                             "(a site makes it with make_site_key)")
    return load_private_key(data, f"{field}: {path}")


def public_key(site_key: PaillierPrivateKey) -> bytes:
    """What the server gets: the public key (the modulus n)."""
    return public_key_bytes(site_key.public_key)


def _slots(key: PaillierPublicKey) -> int:
    return slots_per_ciphertext(key, SLOT_BITS)


def _ciphertext_count(values: int, key: PaillierPublicKey) -> int:
    return -(-values // _slots(key))


def encrypt_parameters(arrays: list[np.ndarray], examples: int, site_key: PaillierPrivateKey) -> Parameters:
    """A site's ``arrays`` times ``examples`` (n_i) in fixed point, packed and encrypted after the
    plain header."""
    header = header_of(arrays, examples, HEADER_FORMAT, SCHEME)
    if examples >> EXAMPLES_BITS:
        raise DataError(f"parameters: num_examples {examples} is 2^{EXAMPLES_BITS} or more")
    digits = [examples * value for value in encode(flatten(arrays), FRAC_BITS, "parameters", VALUE_BITS)]
    key, slots = site_key.public_key, _slots(site_key.public_key)
    packed = [pack(digits[start:start + slots], SLOT_BITS) for start in range(0, len(digits), slots)]
    batch = ciphertexts_to_bytes(key, encrypt(key, packed, site_key))
    return Parameters(tensors=[header.to_bytes(), batch], tensor_type=PAILLIER_TENSOR_TYPE)


def _load_parameters(parameters: Parameters, key: PaillierPublicKey, field: str) -> tuple[Header, list[int]]:
    """The header and checked ciphertexts of encrypted ``parameters``; errors name ``field``."""
    header, payload = header_and_payload(parameters, PAILLIER_TENSOR_TYPE, HEADER_FORMAT, SCHEME, field)
    if len(payload) != 1:
        raise HEInputError(field, f"{len(payload)} tensors after the header, expected one batch of ciphertexts")
    return header, load_ciphertexts(key, payload[0], _ciphertext_count(header.values, key), f"{field}[1]")


def decrypt_average(parameters: Parameters, site_key: PaillierPrivateKey,
                    field: str = "global parameters") -> tuple[Header, np.ndarray]:
    """The header and, in float64, the values of encrypted ``parameters`` (a site's or the
    aggregate): decrypted, unpacked and divided by the header's example count and 2^FRAC_BITS."""
    if not isinstance(site_key, PaillierPrivateKey):
        raise SecurityError("decrypting needs the sites' Paillier private key (load_site_key)")
    header, ciphertexts = _load_parameters(parameters, site_key.public_key, field)
    digits = decrypt_packed(site_key, ciphertexts, header.values, SLOT_BITS, f"{field}[1]")
    flat = np.ldexp(np.array([float(d) for d in digits], dtype=np.float64), -FRAC_BITS) / header.examples
    return header, flat


def decrypt_parameters(parameters: Parameters, site_key: PaillierPrivateKey,
                       field: str = "global parameters") -> list[np.ndarray]:
    """Plain arrays, in their dtypes, from encrypted ``parameters`` (:func:`decrypt_average`)."""
    header, flat = decrypt_average(parameters, site_key, field)
    return header.split(flat)


class _PaillierMod(EncryptionMod):
    """See :func:`paillier_mod`."""

    name = "paillier_mod"
    tensor_type = PAILLIER_TENSOR_TYPE
    key_type = PaillierPrivateKey

    def load_key(self, path: Path) -> PaillierPrivateKey:
        return load_site_key(path)

    def encrypt(self, arrays: list[np.ndarray], examples: int) -> Parameters:
        return encrypt_parameters(arrays, examples, self.key)

    def decrypt(self, parameters: Parameters) -> list[np.ndarray]:
        return decrypt_parameters(parameters, self.key)


def paillier_mod(site_key: PaillierPrivateKey | str | Path) -> EncryptionMod:
    """The client mod: decrypts the global parameters with the sites' private key (or the path of
    its file, loaded on first use) and encrypts the train reply's parameters, weighted by its
    ``num_examples``. Put it first in the ClientApp's mods."""
    return _PaillierMod(site_key)


class PaillierAggregation(EncryptedSum):
    """Wraps a FedAvg strategy: its ``aggregate_fit`` adds the sites' encrypted, weighted parameters
    with ``public_key`` (bytes of :func:`public_key`; a private key is refused)."""

    scheme = SCHEME
    max_examples = (1 << EXAMPLES_BITS) - 1

    def __init__(self, strategy: FedAvg, public_key: bytes) -> None:
        super().__init__(strategy)
        if isinstance(public_key, PaillierPrivateKey) or (isinstance(public_key, bytes)
                                                          and SITE_KEY_FORMAT.encode() in public_key):
            raise SecurityError("federation.paillier.public_key: holds a private key; give the server "
                                "public_key(site_key) and keep the private key on the sites")
        self.public_key = load_public_key(public_key, "federation.paillier.public_key")

    def load(self, parameters: Parameters, field: str) -> tuple[Header, list[int]]:
        return _load_parameters(parameters, self.public_key, field)

    def add(self, total: list[int], other: list[int]) -> list[int]:
        return add(self.public_key, total, other)

    def parameters(self, header: Header, total: list[int]) -> Parameters:
        return Parameters(tensors=[header.to_bytes(), ciphertexts_to_bytes(self.public_key, total)],
                          tensor_type=PAILLIER_TENSOR_TYPE)
