"""Secure compressed transmission: the hybrid "autoencoder + AES" pipeline.

``image -> encoder -> integer latent -> range coder -> AES-256-GCM envelope ==> packet ==>
authenticate and decrypt -> range decoder -> decoder -> image`` (the decoder also denoises when the
model was trained with ``task=denoising``).

Packet format ``MEDSEC-CAE/1`` (all lengths big-endian)::

    magic     13 bytes  b"MEDSEC-CAE/1\\n"
    length     4 bytes  length of the header
    header     JSON (UTF-8, sorted keys), public:
                 format 1; image_shape [C, *spatial]; latent_shape [latent channels, *spatial];
                 levels (symbols per latent element); model (digest of the weights and prior the
                 latent is coded for); coder "range/categorical"; key_id; bits (AES key size);
                 kdf (scrypt parameters for a passphrase key, else null); envelope_bytes
    envelope  nonce (12) || AES-GCM ciphertext of the range-coded latent || tag (16)

The associated data is ``magic || length || header || image id``: the header cannot be changed and
a packet cannot be replayed for another image. The image id is *not* in the packet (file names can
carry patient numbers); the receiver names the image it expects. The entropy model (a per-channel
categorical prior over the latent levels) is part of the model's weights, so it is not sent; the
``model`` digest makes a receiver with other weights fail clearly instead of decoding garbage.
No key material is in the packet: the key travels as a :class:`~medsec.protections.keys.KeyRef`.

The header is only authenticated once its key has been derived, so a receiver checks every field's
type and range first, and the ``kdf`` field against the fixed, bounded scrypt parameters of
:func:`~medsec.protections.keys.check_kdf_params` (a packet cannot make it spend more than one
derivation at N <= 2^20); it keeps at most :data:`KEY_CACHE_SIZE` passphrase keys.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medsec.errors import DataError, SecurityError
from medsec.protections.aes import NONCE_BYTES, TAG_BYTES, cipher_for, seal, unseal
from medsec.protections.keys import KeyRef, SecretKey, check_kdf_params, new_kdf_params

MAGIC = b"MEDSEC-CAE/1\n"
FORMAT_VERSION = 1
CODER = "range/categorical"
PURPOSE = "transmission/cae"
HEADER_FIELDS = ("format", "image_shape", "latent_shape", "levels", "model", "coder", "key_id", "bits", "kdf",
                 "envelope_bytes")
SOURCE_BITS = 8
"""Bits per pixel and channel of the uncompressed image the compression ratio refers to."""
MAX_HEADER_BYTES = 4096
"""A header is a few hundred bytes; a longer one is refused before it is parsed."""
MAX_EXTENT = 1 << 16
"""Largest image or latent extent (and latent channel count) a header may give."""
KEY_CACHE_SIZE = 8
"""Passphrase keys a channel keeps (one per scrypt parameter set seen; least recently used go)."""
_DIGEST = re.compile(r"[0-9a-f]{16}")


# ---- entropy coding ------------------------------------------------------------------------------
def _symbol_probabilities(prior: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
    """One row of the per-channel prior per latent element, in the latent's C order."""
    per_channel = int(np.prod(latent_shape[1:]))
    return np.repeat(prior.astype(np.float32), per_channel, axis=0)


def entropy_encode(latent: np.ndarray, prior: np.ndarray) -> bytes:
    """Range-code an integer latent (C, *spatial), values ``-(L // 2) .. L // 2``, under the
    per-channel categorical ``prior`` (C, L). Lossless; about ``-log2 prior`` bits per element."""
    half = prior.shape[1] // 2
    if latent.min(initial=0) < -half or latent.max(initial=0) > half:
        raise ValueError(f"latent values must lie in [-{half}, {half}]")
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode((latent.reshape(-1) + half).astype(np.int32), constriction.stream.model.Categorical(perfect=False),
                   _symbol_probabilities(prior, latent.shape))
    return encoder.get_compressed().astype("<u4").tobytes()


def entropy_decode(payload: bytes, latent_shape: tuple[int, ...], prior: np.ndarray, what: str = "payload") -> np.ndarray:
    """Inverse of :func:`entropy_encode`."""
    if len(payload) % 4:
        raise DataError(f"{what}: the range-coded latent is not a whole number of 32-bit words")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    symbols = decoder.decode(constriction.stream.model.Categorical(perfect=False),
                             _symbol_probabilities(prior, latent_shape))
    return (symbols.astype(np.int64) - prior.shape[1] // 2).reshape(latent_shape)


# ---- packets -------------------------------------------------------------------------------------
def model_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 digest of the model's state (weights, batch-norm statistics and prior)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_shape(value: Any, min_len: int, max_len: int) -> bool:
    return (isinstance(value, list) and min_len <= len(value) <= max_len
            and all(_is_int(extent, 1, MAX_EXTENT) for extent in value))


def _check_header_fields(header: dict[str, Any], what: str) -> None:
    """Types and ranges of the header fields (the header is authenticated only once the key it
    names has been derived and the envelope opened, so nothing in it is trusted before)."""
    if type(header["format"]) is not int or header["format"] != FORMAT_VERSION or header["coder"] != CODER:
        shown = [value if isinstance(value, (int, str)) and len(str(value)) <= 32 else type(value).__name__
                 for value in (header["format"], header["coder"])]
        raise DataError(f"{what}: header field 'format'/'coder' is {shown[0]}/{shown[1]}; "
                        f"this reader knows {FORMAT_VERSION}/{CODER}")
    problems = {
        "image_shape": (_is_shape(header["image_shape"], 3, 4), "a list [C, *spatial] of 2 or 3 spatial extents"),
        "latent_shape": (_is_shape(header["latent_shape"], 3, 4), "a list [channels, *spatial]"),
        "levels": (_is_int(header["levels"], 3, 255), "an integer from 3 to 255"),
        "model": (isinstance(header["model"], str) and _DIGEST.fullmatch(header["model"]), "16 hex digits"),
        "key_id": (isinstance(header["key_id"], str) and _DIGEST.fullmatch(header["key_id"]), "16 hex digits"),
        "bits": (type(header["bits"]) is int and header["bits"] in (128, 256), "128 or 256"),
        "envelope_bytes": (_is_int(header["envelope_bytes"], NONCE_BYTES + TAG_BYTES, 2**40),
                           f"an integer of at least {NONCE_BYTES + TAG_BYTES}"),
    }
    for field, (ok, expected) in problems.items():
        if not ok:
            raise DataError(f"{what}: header field '{field}' must be {expected}")
    if len(header["latent_shape"]) != len(header["image_shape"]):
        raise DataError(f"{what}: header fields 'image_shape' and 'latent_shape' have different dimensions")
    if header["kdf"] is not None:
        check_kdf_params(header["kdf"], f"{what}: header field 'kdf'", error=DataError)


def read_header(packet: bytes, what: str = "packet") -> tuple[dict[str, Any], bytes, bytes]:
    """Split a packet into (public header, authenticated prefix, envelope); a packet that is not a
    ``MEDSEC-CAE/1`` packet, or whose header is damaged, incomplete or out of bounds (scrypt
    parameters included), raises a :class:`DataError` naming the field."""
    if not packet.startswith(MAGIC):
        raise DataError(f"{what}: not a medsec compressed packet (magic is not {MAGIC!r})")
    start = len(MAGIC) + 4
    if len(packet) < start:
        raise DataError(f"{what}: truncated in the header length field")
    (length,) = struct.unpack(">I", packet[len(MAGIC):start])
    if length > MAX_HEADER_BYTES:
        raise DataError(f"{what}: the header length field says {length} bytes, more than a header can have "
                        f"({MAX_HEADER_BYTES})")
    if len(packet) < start + length:
        raise DataError(f"{what}: truncated in the header ({len(packet) - start} of {length} bytes)")
    try:
        header = json.loads(packet[start:start + length])
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested JSON
        raise DataError(f"{what}: the header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise DataError(f"{what}: the header is not a JSON object")
    missing = [field for field in HEADER_FIELDS if field not in header]
    if missing:
        raise DataError(f"{what}: header field(s) {missing} missing")
    _check_header_fields(header, what)
    envelope = packet[start + length:]
    if len(envelope) != header["envelope_bytes"]:
        raise DataError(f"{what}: truncated or padded: the envelope has {len(envelope)} bytes, header field "
                        f"'envelope_bytes' says {header['envelope_bytes']}")
    return header, packet[:start + length], envelope


def _associated_data(prefix: bytes, image_id: str) -> bytes:
    return prefix + image_id.encode()


class SecureChannel:
    """Send images as encrypted, entropy-coded latents of a :class:`CompressiveAutoencoder`, and
    receive them. Sender and receiver each hold the same trained model (in evaluation mode, not
    changed while the channel is used) and a reference to the same key.

    Args:
        model: a trained ``medsec.models.compression.CompressiveAutoencoder``.
        key: where the key comes from (a :class:`KeyRef` or its config mapping); never the key.
        bits: AES key size (256 or 128).
    """

    def __init__(self, model: torch.nn.Module, key: KeyRef | Mapping[str, Any], bits: int = 256) -> None:
        self.model = model.eval()
        self.key_ref = KeyRef.from_config(key)
        self.bits = bits
        self.digest = model_digest(model)
        self.kdf = new_kdf_params() if self.key_ref.needs_kdf else None
        self._keys: OrderedDict[tuple | None, SecretKey] = OrderedDict()

    def _key(self, kdf: Mapping[str, Any] | None, what: str = "packet") -> SecretKey:
        """The key for scrypt parameters ``kdf`` (``None`` for a key file or variable), checked
        first; a small LRU cache keeps the last :data:`KEY_CACHE_SIZE`, so a stream of packets
        with new salts costs at most one derivation each and never unbounded memory."""
        slot: tuple | None = None  # a key file or variable: one key, whatever the packet says
        if self.key_ref.needs_kdf and kdf is not None:
            kdf = check_kdf_params(kdf, f"{what}: header field 'kdf'", error=DataError)
            slot = tuple(kdf[name] for name in sorted(kdf))
        if slot in self._keys:
            self._keys.move_to_end(slot)
            return self._keys[slot]
        key = self.key_ref.load(kdf, f"{what}: header field 'kdf'")
        self._keys[slot] = key
        while len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return key

    @property
    def prior(self) -> np.ndarray:
        return self.model.prior.detach().cpu().numpy()

    def send(self, image: torch.Tensor, image_id: str) -> bytes:
        """One packet for ``image`` (C, *spatial), values in [0, 1]."""
        device = self.model.prior.device
        latent = self.model.encode(image.unsqueeze(0).to(device))[0].cpu().numpy()
        payload = entropy_encode(latent, self.prior)
        key = self._key(self.kdf)
        header = {"format": FORMAT_VERSION, "image_shape": list(image.shape), "latent_shape": list(latent.shape),
                  "levels": self.model.levels, "model": self.digest, "coder": CODER, "key_id": key.key_id,
                  "bits": self.bits, "kdf": self.kdf, "envelope_bytes": NONCE_BYTES + len(payload) + TAG_BYTES}
        text = json.dumps(header, sort_keys=True).encode()
        prefix = MAGIC + struct.pack(">I", len(text)) + text
        return prefix + bytes(seal(cipher_for(key, PURPOSE, self.bits), payload, _associated_data(prefix, image_id)))

    def receive_latent(self, packet: bytes, image_id: str) -> tuple[dict[str, Any], np.ndarray]:
        """Authenticate, decrypt and entropy-decode a packet: (header, integer latent)."""
        what = f"packet for image '{image_id}'"
        header, prefix, envelope = read_header(packet, what)
        key = self._key(header["kdf"], what)
        if key.key_id != header["key_id"]:
            raise SecurityError(f"{what} was encrypted under key id {header['key_id']}, but "
                                f"{self.key_ref.describe()} has key id {key.key_id}: wrong key")
        payload = unseal(cipher_for(key, PURPOSE, header["bits"]), envelope,
                         _associated_data(prefix, image_id), what)
        self._check_model(header, what)
        return header, entropy_decode(bytes(payload), tuple(header["latent_shape"]), self.prior, what)

    def receive(self, packet: bytes, image_id: str) -> torch.Tensor:
        """The image (C, *spatial) decoded from a packet made by :meth:`send` for ``image_id``."""
        header, latent = self.receive_latent(packet, image_id)
        latent_t = torch.from_numpy(latent).unsqueeze(0).to(self.model.prior.device)
        with torch.no_grad():
            return self.model.decode(latent_t, header["image_shape"][1:])[0].cpu()

    def _check_model(self, header: Mapping[str, Any], what: str) -> None:
        model = self.model
        latent_shape, image_shape = header["latent_shape"], header["image_shape"]
        expected = [-(-extent // model.factor) for extent in image_shape[1:]]
        if header["levels"] != model.levels or latent_shape[0] != model.latent_channels:
            raise DataError(f"{what}: header fields 'levels'/'latent_shape' say {header['levels']} levels and "
                            f"{latent_shape[0]} latent channels; this model has {model.levels} and "
                            f"{model.latent_channels}: wrong model")
        if list(latent_shape[1:]) != expected:
            raise DataError(f"{what}: header field 'latent_shape' {latent_shape} does not fit 'image_shape' "
                            f"{image_shape} at this model's downsampling by {model.factor}: wrong model")
        if header["model"] != self.digest:
            raise DataError(f"{what}: header field 'model' is {header['model']}, this receiver's model is "
                            f"{self.digest}: the sender used other weights or another prior")


# ---- measurement ---------------------------------------------------------------------------------
def image_quality(received: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``received`` against ``clean`` (both (C, *spatial) in [0, 1]), after
    rounding ``received`` to 8 bits as a stored image would be."""
    received = torch.round(received.clamp(0, 1) * 255).unsqueeze(0) / 255
    clean = clean.unsqueeze(0).float()
    return {"psnr": float(peak_signal_noise_ratio(received, clean, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(received, clean, data_range=1.0))}


def bits_per_pixel(num_bytes: int, image_shape: tuple[int, ...] | list[int]) -> float:
    """Bits per pixel (per spatial position, all channels together) of ``num_bytes``."""
    return 8 * num_bytes / int(np.prod(image_shape[1:]))


@dataclass(frozen=True)
class Transmission:
    """One image sent and received: sizes, rate, quality of the received image and times."""

    packet_bytes: int
    bpp: float
    ratio: float
    estimated_bpp: float
    psnr: float
    ssim: float
    encode_ms: float
    decode_ms: float
    received: torch.Tensor


def transmit(channel: SecureChannel, image: torch.Tensor, image_id: str, clean: torch.Tensor | None = None) -> Transmission:
    """Send ``image`` through ``channel`` and receive it; quality against ``clean`` (default:
    ``image`` itself; give the clean image when ``image`` is a noisy one). The rate counts the
    whole packet (header, nonce and tag included)."""
    start = time.perf_counter()
    packet = channel.send(image, image_id)
    sent = time.perf_counter()
    received = channel.receive(packet, image_id)
    done = time.perf_counter()
    latent = channel.model.encode(image.unsqueeze(0).to(channel.model.prior.device))
    bpp = bits_per_pixel(len(packet), image.shape)
    return Transmission(packet_bytes=len(packet), bpp=bpp, ratio=SOURCE_BITS * image.shape[0] / bpp,
                        estimated_bpp=channel.model.estimated_bits(latent) / int(np.prod(image.shape[1:])),
                        encode_ms=1000 * (sent - start), decode_ms=1000 * (done - sent), received=received,
                        **image_quality(received, image if clean is None else clean))


@dataclass(frozen=True)
class JpegResult:
    """A JPEG encoding chosen to match a rate: its quality setting, size, rate and decoded image."""

    quality: int
    num_bytes: int
    bpp: float
    decoded: torch.Tensor


def jpeg_encode(image: torch.Tensor, quality: int) -> JpegResult:
    """Baseline JPEG (Pillow, optimised Huffman tables) of an image (C, H, W) in [0, 1], C = 1 or 3."""
    array = np.round(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "JPEG", quality=quality,
                                                                         optimize=True)
    data = buffer.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255
    decoded_t = torch.from_numpy(decoded.reshape(*decoded.shape[:2], -1)).permute(2, 0, 1)
    return JpegResult(quality, len(data), bits_per_pixel(len(data), image.shape), decoded_t)


def jpeg_at_bpp(image: torch.Tensor, target_bpp: float, qualities: tuple[int, int] = (1, 95)) -> JpegResult:
    """The JPEG of ``image`` whose rate (whole file) is closest to ``target_bpp``, by bisection over
    the quality setting (the rate grows with quality). Out of reach targets give the end qualities."""
    cache: dict[int, JpegResult] = {}

    def at(quality: int) -> JpegResult:
        if quality not in cache:
            cache[quality] = jpeg_encode(image, quality)
        return cache[quality]

    low, high = qualities
    while low < high:  # smallest quality reaching the target
        middle = (low + high) // 2
        if at(middle).bpp >= target_bpp:
            high = middle
        else:
            low = middle + 1
    candidates = [at(low)] + ([at(low - 1)] if low > qualities[0] else [])
    return min(candidates, key=lambda result: abs(result.bpp - target_bpp))
