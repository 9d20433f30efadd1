"""Secure compressed transmission: the CompressAI codec's bit strings in the AES-GCM packet, header
checks, errors that name the field, and the rate and quality figures of :func:`transmit`."""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from medsec.errors import DataError, SecurityError
from medsec.protections import KeyRef, SecretKey
from medsec.protections.keys import write_key_file
from medsec.protections.transmission import MAGIC, SecureChannel, read_header, transmit

codec = pytest.importorskip("medsec.models.codec", reason="CompressAI is not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: no thread pool


def make_model(seed: int = 0, in_channels: int = 1) -> Any:
    torch.manual_seed(seed)
    return codec.HyperpriorCodec(in_channels=in_channels, N=8, M=12).eval()


def images(n: int, size: tuple[int, int] = (36, 44), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Any:
    return make_model()


@pytest.fixture
def channel(model: Any, key_ref: KeyRef) -> SecureChannel:
    return SecureChannel(model, key_ref)


def with_header(packet: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """``packet`` with its JSON header edited by ``change`` (framing kept consistent)."""
    header, _, envelope = read_header(packet)
    change(header)
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + envelope


def test_received_image_is_compressais_own_decoding(channel: SecureChannel, model: Any) -> None:
    image = images(1)[0]
    header, y_string, z_string = channel.receive_strings(channel.send(image, "img-1"), "img-1")
    out = model.compress(model.pad(image[None]))
    assert out["strings"] == [[y_string], [z_string]] and header["z_bytes"] == len(z_string)
    expected = model.decompress(out["strings"], out["shape"])["x_hat"][0, :, :36, :44]
    received = channel.receive(channel.send(image, "img-1"), "img-1")
    assert received.shape == (1, 36, 44)
    torch.testing.assert_close(received, expected, rtol=0, atol=0)


def test_packet_holds_no_key_no_image_id_and_a_documented_header(channel: SecureChannel, key_file: Path) -> None:
    packet = channel.send(images(1)[0], "patient_00012345_001.png")
    key_hex = key_file.read_text().strip()
    for secret in (bytes.fromhex(key_hex), key_hex.encode(), key_hex.upper().encode()):
        assert secret not in packet
    assert b"00012345" not in packet  # the image id is bound as associated data, not sent
    (length,) = struct.unpack(">I", packet[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(packet[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    assert header["format"] == 1 and header["coder"] == "compressai/mean-scale-hyperprior"
    assert header["image_shape"] == [1, 36, 44] and header["bits"] == 256 and header["kdf"] is None
    assert header["key_id"] == KeyRef(source="file", file=str(key_file)).load().key_id
    assert header["envelope_bytes"] == len(packet) - len(MAGIC) - 4 - length


def test_tampering_and_replay_fail_authentication(channel: SecureChannel) -> None:
    packet = channel.send(images(1)[0], "img-1")
    flipped = bytearray(packet)
    flipped[-20] ^= 0x01  # a ciphertext bit
    with pytest.raises(SecurityError, match="packet for image 'img-1' failed authentication"):
        channel.receive(bytes(flipped), "img-1")
    edited = with_header(packet, lambda h: h.update(z_bytes=h["z_bytes"] - 1))  # a header field (authenticated)
    with pytest.raises(SecurityError, match="failed authentication"):
        channel.receive(edited, "img-1")
    with pytest.raises(SecurityError, match="packet for image 'img-2' failed authentication"):
        channel.receive(packet, "img-2")  # replayed for another image


def test_wrong_key_is_named(channel: SecureChannel, tmp_path: Path) -> None:
    packet = channel.send(images(1)[0], "img-1")
    other = KeyRef(source="file", file=str(write_key_file(tmp_path / "other.key", SecretKey.generate())))
    with pytest.raises(SecurityError, match=r"encrypted under key id [0-9a-f]{16}, but key file .*other.key .*wrong key"):
        SecureChannel(channel.model, other).receive(packet, "img-1")


def test_wrong_model_is_named(channel: SecureChannel, key_ref: KeyRef) -> None:
    packet = channel.send(images(1)[0], "img-1")
    with pytest.raises(DataError, match=r"header field 'model' is [0-9a-f]{16}, this receiver's codec is [0-9a-f]{16}"):
        SecureChannel(make_model(seed=1), key_ref).receive(packet, "img-1")  # same shapes, other weights
    with pytest.raises(DataError, match="'image_shape' has 1 channels, this codec codes 3: wrong model"):
        SecureChannel(make_model(in_channels=3), key_ref).receive(packet, "img-1")


def test_sender_refuses_an_image_the_codec_cannot_code(channel: SecureChannel) -> None:
    with pytest.raises(ValueError, match=r"image for 'rgb' has shape \(3, 8, 8\); this codec sends \(1, H, W\)"):
        channel.send(torch.rand(3, 8, 8), "rgb")


@pytest.mark.parametrize("field, value, message", [
    ("format", 2, "'format'/'coder' is 2/"), ("format", True, "'format'/'coder' is True/"),
    ("coder", "range/categorical", "'format'/'coder' is 1/range/categorical"),
    ("image_shape", [1, 36], "'image_shape' must be"), ("image_shape", [2, 36, 44], "'image_shape' must be"),
    ("image_shape", [1, -36, 44], "'image_shape' must be"), ("image_shape", [1, 36.0, 44], "'image_shape' must be"),
    ("image_shape", [1, 16384, 16384], "'image_shape' must be"), ("image_shape", "1x36x44", "'image_shape' must be"),
    ("model", 7, "'model' must be 16 hex digits"), ("key_id", "KEY", "'key_id' must be 16 hex digits"),
    ("bits", 192, "'bits' must be 128 or 256"), ("envelope_bytes", -1, "'envelope_bytes' must be an integer"),
    ("envelope_bytes", 10**40, "'envelope_bytes' must be an integer"),
    ("z_bytes", -1, "'z_bytes' must be an integer from 0 to"), ("z_bytes", 10**9, "'z_bytes' must be an integer"),
    ("z_bytes", "3", "'z_bytes' must be an integer"), ("kdf", [1, 2], "'kdf'"),
])
def test_malformed_header_fields_are_named(channel: SecureChannel, field: str, value: Any, message: str) -> None:
    bad = with_header(channel.send(images(1)[0], "img"), lambda h: h.update({field: value}))
    with pytest.raises(DataError, match=f"packet for image 'img': header field {message}"):
        channel.receive(bad, "img")


def test_missing_field_and_framing_errors_are_named(channel: SecureChannel) -> None:
    packet = channel.send(images(1)[0], "img")
    with pytest.raises(DataError, match=r"header field\(s\) \['z_bytes'\] missing"):
        channel.receive(with_header(packet, lambda h: h.pop("z_bytes")), "img")
    with pytest.raises(DataError, match="the header length field says 4294967295 bytes"):
        channel.receive(MAGIC + struct.pack(">I", 2**32 - 1) + packet[len(MAGIC) + 4:], "img")
    with pytest.raises(DataError, match="the header is not valid JSON"):
        channel.receive(MAGIC + struct.pack(">I", 3) + b"{x}" + bytes(40), "img")
    with pytest.raises(DataError, match="the header is not a JSON object"):
        channel.receive(MAGIC + struct.pack(">I", 2) + b"[]", "img")
    with pytest.raises(DataError, match="not a medsec compressed packet"):
        channel.receive(b"MEDSEC-CAE/1\n" + packet[len(MAGIC):], "img")  # the old format


@pytest.mark.parametrize("cut, message", [(15, "truncated in the header length"), (30, "truncated in the header"),
                                          (-1, "envelope has .* 'envelope_bytes'")])
def test_truncated_packets_name_the_field(channel: SecureChannel, cut: int, message: str) -> None:
    packet = channel.send(images(1)[0], "img-1")
    with pytest.raises(DataError, match=f"packet for image 'img-1': .*{message}"):
        channel.receive(packet[:cut], "img-1")


def test_passphrase_key_travels_as_scrypt_parameters(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEC_PASS", "correct horse battery staple")
    ref = {"source": "passphrase", "passphrase_env": "CODEC_PASS"}
    packet = SecureChannel(model, ref).send(images(1)[0], "img-1")
    header, _, _ = read_header(packet)
    assert header["kdf"]["name"] == "scrypt" and b"correct horse" not in packet
    assert SecureChannel(model, ref).receive(packet, "img-1").shape == (1, 36, 44)
    monkeypatch.setenv("CODEC_PASS", "wrong")
    with pytest.raises(SecurityError, match="wrong key"):
        SecureChannel(model, ref).receive(packet, "img-1")


def test_transmit_counts_the_whole_packet(channel: SecureChannel) -> None:
    clean = images(1, size=(32, 32))[0]
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    result = transmit(channel, noisy, "img-1", clean=clean)
    assert result.bpp == pytest.approx(8 * result.packet_bytes / (32 * 32))
    assert result.ratio == pytest.approx(8 / result.bpp)
    header_bits = 8 * (result.packet_bytes - 28) / (32 * 32) - result.payload_bpp  # framing beyond nonce and tag
    assert result.payload_bpp < result.bpp and header_bits > 0 and result.encode_ms > 0 and result.decode_ms > 0
    mse = float(((torch.round(result.received * 255) / 255 - clean) ** 2).mean())
    assert result.psnr == pytest.approx(-10 * math.log10(mse), rel=1e-4)
    assert -1 <= result.ssim <= 1 and result.ms_ssim is None  # 32x32 is too small for five scales


# ---- a standard codec in the packet --------------------------------------------------------------
@pytest.mark.parametrize("name, setting", [("JPEG 2000", 0.5), ("WebP", 60)])
def test_a_standard_codec_file_is_sealed_and_decoded_as_pillow_does(name: str, setting: float, key_ref: KeyRef) -> None:
    from medsec.analysis.image_codecs import from_bytes
    from medsec.models.standard_codec import StandardCodec

    standard = StandardCodec(name, setting)
    channel = SecureChannel(standard, key_ref)
    image = images(1, (48, 64))[0]
    packet = channel.send(image, "scan-7")
    header, file, _ = channel.receive_strings(packet, "scan-7")
    assert header["coder"] == standard.coder and file == standard.compress_image(image)[0]
    received = channel.receive(packet, "scan-7")
    assert torch.equal(received, from_bytes(file, 1)) and received.shape == (1, 48, 64)
    with pytest.raises(SecurityError):
        channel.receive(packet, "scan-8")  # bound to its image id, like the learned codec's


def test_a_receiver_of_another_codec_or_setting_refuses_the_packet(channel: SecureChannel, key_ref: KeyRef) -> None:
    from medsec.models.standard_codec import StandardCodec

    packet = SecureChannel(StandardCodec("JPEG 2000", 0.5), key_ref).send(images(1)[0], "a")
    with pytest.raises(DataError, match="header field 'coder' is pillow/jpeg2000.*wrong codec"):
        channel.receive(packet, "a")
    with pytest.raises(DataError, match="header field 'model'"):
        SecureChannel(StandardCodec("JPEG 2000", 0.3), key_ref).receive(packet, "a")


def test_a_standard_file_of_another_size_is_refused_before_decoding(key_ref: KeyRef) -> None:
    """An authenticated packet (the key holder made it) whose file is larger than the header says: the
    decoder reads the file's header and stops."""
    from medsec.models.standard_codec import StandardCodec

    standard = StandardCodec("WebP", 50)
    channel = SecureChannel(standard, key_ref)
    honest = channel.send(images(1, (16, 16))[0], "x")
    big_file = standard.compress_image(images(1, (64, 64))[0])[0]
    standard.compress_image = lambda image: (big_file, b"")  # the sender lies about the size
    forged = channel.send(images(1, (16, 16))[0], "x")
    assert channel.receive(honest, "x").shape == (1, 16, 16)
    with pytest.raises(DataError, match=r"packet for image 'x': the WebP file is 64x64, the packet announced 16x16"):
        channel.receive(forged, "x")
    with pytest.raises(ValueError, match="format must be one of"):
        StandardCodec("GIF", 1)
