"""Secure compressed transmission: a learned codec (CompressAI) inside an AES-256-GCM packet.

``image -> codec (analysis, hyperprior, CompressAI's range coder) -> bit strings -> AES-256-GCM
envelope ==> packet ==> authenticate and decrypt -> range decoder -> synthesis -> image``.

Packet format ``MEDSEC-LIC/1`` (learned image codec; all lengths big-endian)::

    magic     13 bytes  b"MEDSEC-LIC/1\\n"
    length     4 bytes  length of the header
    header     JSON (UTF-8, sorted keys), public:
                 format 1; image_shape [C, H, W]; model (digest of the codec's weights and coder
                 tables); coder (one of CODERS: the learned codec, or JPEG 2000 / WebP through
                 Pillow, whose file is the payload); key_id; bits (AES key size);
                 kdf (scrypt parameters for a passphrase key, else null); z_bytes (length of the
                 hyper-latent's bit string); envelope_bytes
    envelope  nonce (12) || AES-GCM ciphertext of (z bit string || y bit string) || tag (16)

The associated data is ``magic || length || header || image id``: the header cannot be changed and
a packet cannot be replayed for another image. The image id is *not* in the packet (file names can
carry patient numbers); the receiver names the image it expects. The entropy models are part of
the codec's weights, so they are not sent; both ends rebuild the range coder's tables from the
weights (``update``), and the ``model`` digest, taken over the weights *and* those tables, makes a
receiver with other weights (or other tables) fail clearly instead of decoding garbage. No key
material is in the packet: the key travels as a :class:`~medsec.protections.keys.KeyRef`.

The header is only authenticated once its key has been derived, so a receiver checks every field's
type and range first (the image size against :data:`MAX_EXTENT` and :data:`MAX_PIXELS`), and the
``kdf`` field against the fixed, bounded scrypt parameters of
:func:`~medsec.protections.keys.check_kdf_params` (a packet cannot make it spend more than one
derivation at N <= 2^20); it keeps at most :data:`KEY_CACHE_SIZE` passphrase keys.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from medsec.analysis.image_codecs import bits_per_pixel, image_quality
from medsec.errors import DataError, SecurityError
from medsec.protections.aes import NONCE_BYTES, TAG_BYTES, cipher_for, seal, unseal
from medsec.protections.keys import KeyRef, SecretKey, check_kdf_params, new_kdf_params

MAGIC = b"MEDSEC-LIC/1\n"
FORMAT_VERSION = 1
CODERS = ("compressai/mean-scale-hyperprior", "pillow/jpeg2000", "pillow/webp")
"""The codecs a packet may carry: the learned codec's bit strings, or a standard codec's file."""
PURPOSE = "transmission/codec"
HEADER_FIELDS = ("format", "image_shape", "model", "coder", "key_id", "bits", "kdf", "z_bytes", "envelope_bytes")
SOURCE_BITS = 8
"""Bits per pixel and channel of the uncompressed image the compression ratio refers to."""
MAX_HEADER_BYTES = 4096
"""A header is a few hundred bytes; a longer one is refused before it is parsed."""
MAX_EXTENT = 1 << 14
"""Largest image height or width a header may give."""
MAX_PIXELS = 1 << 26
"""Largest image area (height x width) a header may give: the decoder's memory grows with it."""
MAX_ENVELOPE_BYTES = 1 << 32
"""Largest envelope a header may announce."""
KEY_CACHE_SIZE = 8
"""Passphrase keys a channel keeps (one per scrypt parameter set seen; least recently used go)."""
_DIGEST = re.compile(r"[0-9a-f]{16}")
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES


# ---- packets -------------------------------------------------------------------------------------
def model_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 digest of the codec's parameters and buffers, the range coder's tables
    (not saved in checkpoints, rebuilt from the weights) included."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_image_shape(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3 and type(value[0]) is int and value[0] in (1, 3)
            and all(_is_int(extent, 1, MAX_EXTENT) for extent in value[1:]) and value[1] * value[2] <= MAX_PIXELS)


def _check_header_fields(header: dict[str, Any], what: str) -> None:
    """Types and ranges of the header fields (the header is authenticated only once the key it
    names has been derived and the envelope opened, so nothing in it is trusted before)."""
    if type(header["format"]) is not int or header["format"] != FORMAT_VERSION or header["coder"] not in CODERS:
        shown = [value if isinstance(value, (int, str)) and len(str(value)) <= 40 else type(value).__name__
                 for value in (header["format"], header["coder"])]
        raise DataError(f"{what}: header field 'format'/'coder' is {shown[0]}/{shown[1]}; "
                        f"this reader knows {FORMAT_VERSION}/{'|'.join(CODERS)}")
    problems = {
        "image_shape": (_is_image_shape(header["image_shape"]),
                        f"a list [C, H, W] with C 1 or 3, H and W from 1 to {MAX_EXTENT}, H x W at most {MAX_PIXELS}"),
        "model": (isinstance(header["model"], str) and _DIGEST.fullmatch(header["model"]), "16 hex digits"),
        "key_id": (isinstance(header["key_id"], str) and _DIGEST.fullmatch(header["key_id"]), "16 hex digits"),
        "bits": (type(header["bits"]) is int and header["bits"] in (128, 256), "128 or 256"),
        "envelope_bytes": (_is_int(header["envelope_bytes"], OVERHEAD_BYTES, MAX_ENVELOPE_BYTES),
                           f"an integer from {OVERHEAD_BYTES} to {MAX_ENVELOPE_BYTES}"),
    }
    for field, (ok, expected) in problems.items():
        if not ok:
            raise DataError(f"{what}: header field '{field}' must be {expected}")
    payload_bytes = header["envelope_bytes"] - OVERHEAD_BYTES
    if not _is_int(header["z_bytes"], 0, payload_bytes):
        raise DataError(f"{what}: header field 'z_bytes' must be an integer from 0 to {payload_bytes} (the "
                        "payload's length)")
    if header["kdf"] is not None:
        check_kdf_params(header["kdf"], f"{what}: header field 'kdf'", error=DataError)


def read_header(packet: bytes, what: str = "packet") -> tuple[dict[str, Any], bytes, bytes]:
    """Split a packet into (public header, authenticated prefix, envelope); a packet that is not a
    ``MEDSEC-LIC/1`` packet, or whose header is damaged, incomplete or out of bounds (scrypt
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
    """Send images as encrypted bit strings of a learned codec, and receive them. Sender and
    receiver each hold the same trained codec (in evaluation mode, not changed while the channel
    is used; the channel rebuilds its coder tables) and a reference to the same key.

    Args:
        model: a trained ``medsec.models.codec.HyperpriorCodec``, a
            ``medsec.models.standard_codec.StandardCodec`` (JPEG 2000 or WebP), or any codec with
            ``coder`` (one of :data:`CODERS`), ``update``, ``in_channels``, ``compress_image`` and
            ``decompress_image``.
        key: where the key comes from (a :class:`KeyRef` or its config mapping); never the key.
        bits: AES key size (256 or 128).
    """

    def __init__(self, model: torch.nn.Module, key: KeyRef | Mapping[str, Any], bits: int = 256) -> None:
        self.model = model.eval()
        self.model.update(force=True)  # the range coder's tables from these weights, not from a file
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
    def device(self) -> torch.device:
        return next(itertools.chain(self.model.parameters(), self.model.buffers())).device

    def send(self, image: torch.Tensor, image_id: str) -> bytes:
        """One packet for ``image`` (C, H, W), values in [0, 1]."""
        if image.ndim != 3 or image.shape[0] != self.model.in_channels:
            raise ValueError(f"image for '{image_id}' has shape {tuple(image.shape)}; this codec sends "
                             f"({self.model.in_channels}, H, W)")
        y_string, z_string = self.model.compress_image(image.to(self.device))
        payload = z_string + y_string
        key = self._key(self.kdf)
        header = {"format": FORMAT_VERSION, "image_shape": list(image.shape), "model": self.digest, "coder": self.model.coder,
                  "key_id": key.key_id, "bits": self.bits, "kdf": self.kdf, "z_bytes": len(z_string),
                  "envelope_bytes": OVERHEAD_BYTES + len(payload)}
        text = json.dumps(header, sort_keys=True).encode()
        prefix = MAGIC + struct.pack(">I", len(text)) + text
        return prefix + bytes(seal(cipher_for(key, PURPOSE, self.bits), payload, _associated_data(prefix, image_id)))

    def receive_strings(self, packet: bytes, image_id: str) -> tuple[dict[str, Any], bytes, bytes]:
        """Authenticate and decrypt a packet: (header, y bit string, z bit string)."""
        what = f"packet for image '{image_id}'"
        header, prefix, envelope = read_header(packet, what)
        key = self._key(header["kdf"], what)
        if key.key_id != header["key_id"]:
            raise SecurityError(f"{what} was encrypted under key id {header['key_id']}, but "
                                f"{self.key_ref.describe()} has key id {key.key_id}: wrong key")
        payload = bytes(unseal(cipher_for(key, PURPOSE, header["bits"]), envelope,
                               _associated_data(prefix, image_id), what))
        self._check_model(header, what)
        return header, payload[header["z_bytes"]:], payload[:header["z_bytes"]]

    def receive(self, packet: bytes, image_id: str) -> torch.Tensor:
        """The image (C, H, W) decoded from a packet made by :meth:`send` for ``image_id``."""
        header, y_string, z_string = self.receive_strings(packet, image_id)
        try:
            return self.model.decompress_image(y_string, z_string, header["image_shape"][1:]).cpu()
        except ValueError as err:
            raise DataError(f"packet for image '{image_id}': {err}") from None

    def _check_model(self, header: Mapping[str, Any], what: str) -> None:
        if header["coder"] != self.model.coder:
            raise DataError(f"{what}: header field 'coder' is {header['coder']}, this receiver decodes "
                            f"{self.model.coder}: wrong codec")
        channels = header["image_shape"][0]
        if channels != self.model.in_channels:
            raise DataError(f"{what}: header field 'image_shape' has {channels} channels, this codec codes "
                            f"{self.model.in_channels}: wrong model")
        if header["model"] != self.digest:
            raise DataError(f"{what}: header field 'model' is {header['model']}, this receiver's codec is "
                            f"{self.digest}: the sender used other weights or other coder tables")


# ---- measurement ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transmission:
    """One image sent and received: sizes, rates, quality of the received image and times.
    ``bpp`` counts the whole packet; ``payload_bpp`` the codec's bit strings alone."""

    packet_bytes: int
    bpp: float
    payload_bpp: float
    ratio: float
    psnr: float
    ssim: float
    ms_ssim: float | None
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
    header, _, _ = read_header(packet)
    bpp = bits_per_pixel(len(packet), image.shape)
    quality = image_quality(received, image if clean is None else clean)
    return Transmission(packet_bytes=len(packet), bpp=bpp,
                        payload_bpp=bits_per_pixel(header["envelope_bytes"] - OVERHEAD_BYTES, image.shape),
                        ratio=SOURCE_BITS * image.shape[0] / bpp, psnr=quality["psnr"], ssim=quality["ssim"],
                        ms_ssim=quality.get("ms_ssim"), encode_ms=1000 * (sent - start),
                        decode_ms=1000 * (done - sent), received=received)

