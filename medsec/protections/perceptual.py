"""`crypto=perceptual`: keyed block-based perceptual encryption (encryption-then-compression, EtC).

The scheme of Kurihara, Kiya et al. on 8-bit images ``(C, H, W)``: split the image into BxB
blocks, then (each step can be switched off)

1. **block scrambling**: a keyed permutation of the block positions;
2. **rotation/flip**: each block turned by 0/90/180/270 degrees and mirrored or not (the 8
   symmetries of a square);
3. **negative-positive**: the pixels ``p`` of keyed blocks become ``255 - p``;
4. **channel shuffle**: a keyed permutation of the colour channels of each block. Colour (3-channel)
   images only: grey images skip this step.

Every step moves whole blocks or turns, mirrors, negates or re-orders the channels of one block, so
each block keeps its statistics (its spread exactly; its histogram up to negation) and, with ``B`` a
multiple of 8, JPEG's 8x8 grid still sees the same blocks: encrypted images stay JPEG-compressible,
and decryption is exact.

**Weakness, stated plainly.** With the default ``per_image=false`` the *same* key gives the *same*
block permutation and per-block choices for every image of a given size. That is what keeps a
network trainable on encrypted images (the encryption is a fixed, learnable re-arrangement), and it
is also what makes the scheme weak: block contents are visible (a perceptual, not semantic,
protection), jigsaw-puzzle solvers and known-plaintext pairs recover the permutation, and one
recovered key opens every image. ``per_image=true`` derives the permutation from the key *and* the
image id (stronger for storage and transmission), at the cost of trainability. The parameters come
from a NumPy generator seeded with an HKDF sub-key: not a cryptographic cipher, and not a
replacement for ``crypto=aes`` where confidentiality matters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

from medsec.core.contracts import Protection
from medsec.data.sources.base import DataSource, Record, SourceData
from medsec.data.transforms import KeysT, LoadImageNamed
from medsec.errors import ConfigError, DataError
from medsec.protections.keys import KeyRef, SecretKey

SEED_BYTES = 32


@dataclass(frozen=True)
class BlockScheme:
    """Which steps run, on which block size. Fields are the ``crypto.*`` config fields."""

    block_size: int = 4
    scramble: bool = True
    rotate_flip: bool = True
    negative_positive: bool = True
    channel_shuffle: bool = True
    per_image: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ConfigError(f"crypto.block_size must be a positive integer, got {self.block_size!r}")
        if not (self.scramble or self.rotate_flip or self.negative_positive or self.channel_shuffle):
            raise ConfigError("crypto: every step (scramble, rotate_flip, negative_positive, channel_shuffle) "
                              "is off")

    @property
    def purpose(self) -> str:
        """The HKDF purpose of this scheme's sub-key: another block size gives an independent key."""
        return f"perceptual/v1/block{self.block_size}"


@dataclass(frozen=True)
class BlockParams:
    """One image's keyed choices, for ``n`` blocks of ``c`` channels."""

    order: np.ndarray
    """(n,): encrypted block ``i`` is plain block ``order[i]``."""
    turns: np.ndarray
    """(n,): quarter turns (0..3) of each block."""
    mirror: np.ndarray
    """(n,) bool: mirror the block left-right after turning it."""
    negate: np.ndarray
    """(n,) bool: negative-positive transform of the block."""
    channels: np.ndarray
    """(n, c): channel permutation of each block (identity for grey images)."""


def as_uint8(img: Any, where: str) -> np.ndarray:
    """``img`` as a ``(C, H, W)`` uint8 array. Floats must lie in [0, 1] (they are rounded to 8 bits);
    anything else (uint16, Hounsfield units, ...) has an unknown 8-bit range and is refused."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3:
        raise DataError(f"{where}: perceptual encryption needs a 2D image (C, H, W), "
                        f"got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    unit = np.issubdtype(arr.dtype, np.floating) and arr.size and np.isfinite(arr).all()
    if unit and arr.min() >= 0 and arr.max() <= 1:
        return np.round(arr * 255).astype(np.uint8)
    lo, hi = (arr.min(), arr.max()) if arr.size else (None, None)
    raise DataError(f"{where}: perceptual encryption works on 8-bit pixels: uint8, or floats in [0, 1]; got "
                    f"{arr.dtype} in [{lo}, {hi}] (window and scale to 8 bits first)")


def to_blocks(img: np.ndarray, b: int) -> np.ndarray:
    """``(C, H, W)`` -> ``(n, C, b, b)`` blocks in row-major order."""
    c, h, w = img.shape
    return img.reshape(c, h // b, b, w // b, b).transpose(1, 3, 0, 2, 4).reshape(-1, c, b, b)


def from_blocks(blocks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`to_blocks`."""
    _, c, b, _ = blocks.shape
    return blocks.reshape(h // b, w // b, c, b, b).transpose(2, 0, 3, 1, 4).reshape(c, h, w)


class PerceptualEncrypt(Transform):
    """Array transform: keyed block-based encryption of a ``(C, H, W)`` 8-bit image; :meth:`inverse`
    decrypts. Returns uint8 NumPy arrays.

    Args:
        seed: the scheme's secret sub-key (:meth:`from_key` derives it from a master key).
        scheme: block size and steps.
    """

    def __init__(self, seed: bytes, scheme: BlockScheme | None = None) -> None:
        if len(seed) != SEED_BYTES:
            raise ConfigError(f"a perceptual-encryption seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._seed = bytes(seed)
        self.scheme = scheme or BlockScheme()
        self._shared: dict[tuple[int, ...], BlockParams] = {}

    @classmethod
    def from_key(cls, key: SecretKey, scheme: BlockScheme | None = None) -> PerceptualEncrypt:
        scheme = scheme or BlockScheme()
        return cls(key.derive(scheme.purpose, SEED_BYTES), scheme)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheme})"

    def params(self, shape: tuple[int, ...], image_id: str | None = None) -> BlockParams:
        """The keyed choices for an image of ``shape``: shared by all images of that shape, or
        per image (``per_image``: HMAC of the image id under the seed)."""
        if not self.scheme.per_image:
            if shape not in self._shared:
                self._shared[shape] = self._draw(shape, self._seed)
            return self._shared[shape]
        if image_id is None:
            raise DataError("crypto.per_image=true needs an image id for every image")
        return self._draw(shape, hmac.new(self._seed, str(image_id).encode(), hashlib.sha256).digest())

    def _draw(self, shape: tuple[int, ...], seed: bytes) -> BlockParams:
        c, h, w = shape
        b = self.scheme.block_size
        n = (h // b) * (w // b)
        rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
        channels = rng.permuted(np.tile(np.arange(c), (n, 1)), axis=1)
        return BlockParams(order=rng.permutation(n), turns=rng.integers(0, 4, n), mirror=rng.random(n) < 0.5,
                           negate=rng.random(n) < 0.5, channels=channels)

    def _blocks(self, img: Any, image_id: str | None) -> tuple[np.ndarray, BlockParams, tuple[int, int]]:
        where = f"record {image_id}" if image_id is not None else "image"
        arr = as_uint8(img, where)
        b, (_, h, w) = self.scheme.block_size, arr.shape
        if h % b or w % b:
            raise DataError(f"{where}: image size {h}x{w} is not divisible by crypto.block_size={b} "
                            "(resize or crop the source, or pick another block size)")
        return to_blocks(arr, b).copy(), self.params(arr.shape, image_id), (h, w)

    def __call__(self, img: Any, image_id: str | None = None) -> np.ndarray:
        blocks, p, (h, w) = self._blocks(img, image_id)
        s = self.scheme
        if s.scramble:
            blocks = blocks[p.order]
        if s.rotate_flip:
            for k in (1, 2, 3):
                blocks[p.turns == k] = np.rot90(blocks[p.turns == k], k, axes=(2, 3))
            blocks[p.mirror] = blocks[p.mirror][..., ::-1]
        if s.negative_positive:
            blocks[p.negate] = 255 - blocks[p.negate]
        if s.channel_shuffle and blocks.shape[1] == 3:
            blocks = np.take_along_axis(blocks, p.channels[:, :, None, None], axis=1)
        return from_blocks(blocks, h, w)

    def inverse(self, img: Any, image_id: str | None = None) -> np.ndarray:
        """Decrypt: the steps of :meth:`__call__` undone in reverse order (exact)."""
        blocks, p, (h, w) = self._blocks(img, image_id)
        s = self.scheme
        if s.channel_shuffle and blocks.shape[1] == 3:
            blocks = np.take_along_axis(blocks, np.argsort(p.channels, axis=1)[:, :, None, None], axis=1)
        if s.negative_positive:
            blocks[p.negate] = 255 - blocks[p.negate]
        if s.rotate_flip:
            blocks[p.mirror] = blocks[p.mirror][..., ::-1]
            for k in (1, 2, 3):
                blocks[p.turns == k] = np.rot90(blocks[p.turns == k], -k, axes=(2, 3))
        if s.scramble:
            plain = np.empty_like(blocks)
            plain[p.order] = blocks
            blocks = plain
        return from_blocks(blocks, h, w)


class PerceptualEncryptd(MapTransform):
    """Dictionary version of :class:`PerceptualEncrypt` (the record's ``id_key`` names the image in
    errors and seeds ``per_image`` keys). ``decrypt=True`` applies the inverse instead."""

    def __init__(self, keys: KeysT, cipher: PerceptualEncrypt, id_key: str = "id", decrypt: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cipher = cipher
        self.id_key = id_key
        self.decrypt = decrypt

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        step = self.cipher.inverse if self.decrypt else self.cipher
        for key in self.key_iterator(d):
            d[key] = step(d[key], d.get(self.id_key))
        return d


class ChainTransform(Transform):
    """Deterministic steps in order: unlike MONAI's ``Compose`` (which counts as random), it is
    cached by ``CacheDataset``, so images are encrypted once, in memory."""

    def __init__(self, steps: Sequence[Callable[[Record], Record]]) -> None:
        self.steps = list(steps)

    def __call__(self, data: Record) -> Record:
        for step in self.steps:
            data = step(data)
        return data


class PerceptualSource(DataSource):
    """A source whose images arrive encrypted: the wrapped source's records, read as usual, then
    encrypted first thing in the pipeline (on 8-bit pixels, before any scaling)."""

    def __init__(self, source: DataSource, encrypt: PerceptualEncryptd) -> None:
        self.source = source
        self._encrypt = encrypt

    @property
    def dataset_id(self) -> str:
        return self.source.dataset_id

    def load(self) -> SourceData:
        data = self.source.load()
        reader = data.reader
        if reader is None and data.from_files:
            reader = LoadImageNamed(["image", "mask"], allow_missing_keys=True)
        steps = [reader, self._encrypt] if reader is not None else [self._encrypt]
        info = {**data.info, "crypto": "perceptual"}
        return dataclasses.replace(data, reader=ChainTransform(steps), info=info)


class PerceptualStage(Protection):
    """``protect=[perceptual]``: the configured perceptual-encryption protection.

    Training and testing see only encrypted images; checkpoints and outputs are written plainly
    (there is nothing to seal: the model never sees a plain image). Only the ``image`` key is
    encrypted, so it serves classification; a segmentation mask would need the same spatial steps.

    Args:
        key: key reference (``source`` file or env and its field); never the key. Passphrase keys
            are refused (there is no file to hold their scrypt salt).
        block_size: block edge in pixels; image sides must be multiples of it.
        scramble, rotate_flip, negative_positive, channel_shuffle: which steps run.
        per_image: derive the choices from key + image id (stronger, but not trainable).
    """

    name = "perceptual"
    order = 20
    confidential = True

    def __init__(self, key: Mapping[str, Any] | KeyRef, block_size: int = 4, scramble: bool = True,
                 rotate_flip: bool = True, negative_positive: bool = True, channel_shuffle: bool = True,
                 per_image: bool = False) -> None:
        self.key = KeyRef.from_config(key)
        if self.key.needs_kdf:
            raise ConfigError("crypto.key.source=passphrase is not supported by crypto=perceptual; "
                              "use source=file or source=env")
        self.scheme = BlockScheme(block_size, scramble, rotate_flip, negative_positive, channel_shuffle,
                                  per_image)

    def cipher(self) -> PerceptualEncrypt:
        """The array transform under this stage's key (read now; a missing key fails here)."""
        return PerceptualEncrypt.from_key(self.key.load(), self.scheme)

    def check(self, task_info: Mapping[str, Any], task_target: str) -> None:
        # detection too: its boxes stay where the lesions were, which is what block scrambling does to a detector
        if not task_target.endswith(("ClassificationTask", "DetectionTask")):
            raise ConfigError(f"protect: perceptual encrypts images only (not masks or targets), so it serves "
                              f"classification and detection; {task_target.rsplit('.', 1)[-1]} is not supported")

    def wrap_source(self, source: DataSource) -> PerceptualSource:
        """``source`` with its images encrypted on reading."""
        if isinstance(source, PerceptualSource):
            return source
        return PerceptualSource(source, PerceptualEncryptd("image", self.cipher()))
