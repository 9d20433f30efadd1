"""Secure compressed transmission: packet format, entropy coding, AES-GCM envelope, errors, JPEG matching."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from medsec.errors import DataError, SecurityError
from medsec.models.compression import CompressiveAutoencoder
from medsec.protections import KeyRef, SecretKey
from medsec.protections.keys import write_key_file
from medsec.protections.transmission import (
    MAGIC,
    SecureChannel,
    entropy_decode,
    entropy_encode,
    jpeg_at_bpp,
    jpeg_encode,
    read_header,
    transmit,
)


def make_model(seed: int = 0, latent_channels: int = 4) -> CompressiveAutoencoder:
    torch.manual_seed(seed)
    model = CompressiveAutoencoder(channels=(8, 16), latent_channels=latent_channels, levels=5).eval()
    with torch.no_grad():
        model.to_latent.conv.weight.mul_(30)  # an untrained latent spread over all five levels
    model.fit_prior(images(4, seed=seed + 1))
    return model


def images(n: int, size: tuple[int, int] = (36, 44), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *size, generator=generator)


@pytest.fixture
def model() -> CompressiveAutoencoder:
    return make_model()


@pytest.fixture
def channel(model: CompressiveAutoencoder, key_ref: KeyRef) -> SecureChannel:
    return SecureChannel(model, key_ref)


def test_round_trip_is_bit_exact_on_the_latent(channel: SecureChannel, model: CompressiveAutoencoder) -> None:
    image = images(1)[0]
    header, latent = channel.receive_latent(channel.send(image, "img-1"), "img-1")
    expected = model.encode(image.unsqueeze(0))[0].numpy()
    assert np.array_equal(latent, expected) and len(np.unique(latent)) >= 3
    assert header["image_shape"] == [1, 36, 44] and header["latent_shape"] == [4, 9, 11]
    received = channel.receive(channel.send(image, "img-1"), "img-1")
    torch.testing.assert_close(received, model.decode(torch.from_numpy(expected)[None], (36, 44))[0], rtol=0, atol=0)


def test_entropy_coder_is_lossless_and_near_the_information_content() -> None:
    rng = np.random.default_rng(0)
    prior = np.array([[0.02, 0.08, 0.8, 0.08, 0.02], [0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.3, 0.1, 0.05, 0.05]])
    latent = np.stack([rng.choice(5, size=(20, 30), p=p) for p in prior]) - 2
    payload = entropy_encode(latent, prior)
    assert np.array_equal(entropy_decode(payload, latent.shape, prior), latent)
    information = -sum(np.log2(prior[c, latent[c] + 2]).sum() for c in range(3))
    assert information < 8 * len(payload) <= information * 1.01 + 64  # within 1 % plus the final word(s)
    with pytest.raises(ValueError, match=r"\[-2, 2\]"):
        entropy_encode(latent + 3, prior)


def test_packet_size_matches_the_models_estimate(channel: SecureChannel, model: CompressiveAutoencoder) -> None:
    image = images(1, size=(64, 64), seed=5)[0]
    header, _, envelope = read_header(channel.send(image, "x"), "packet")
    estimate = model.estimated_bits(model.encode(image.unsqueeze(0)))
    payload_bits = 8 * (len(envelope) - 28)  # nonce and tag
    assert estimate <= payload_bits <= estimate * 1.02 + 64


def test_packet_holds_no_key_no_image_id_and_a_documented_header(channel: SecureChannel, key_file: Path,
                                                                  model: CompressiveAutoencoder) -> None:
    packet = channel.send(images(1)[0], "patient_00012345_001.png")
    key_hex = key_file.read_text().strip()
    for secret in (bytes.fromhex(key_hex), key_hex.encode(), key_hex.upper().encode()):
        assert secret not in packet
    assert b"00012345" not in packet  # the image id is bound as associated data, not sent
    assert packet.startswith(MAGIC)
    (length,) = struct.unpack(">I", packet[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(packet[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    assert header["format"] == 1 and header["levels"] == 5 and header["bits"] == 256 and header["kdf"] is None
    assert header["key_id"] == KeyRef(source="file", file=str(key_file)).load().key_id
    assert header["envelope_bytes"] == len(packet) - len(MAGIC) - 4 - length


def test_tampering_and_replay_fail_authentication(channel: SecureChannel) -> None:
    packet = bytearray(channel.send(images(1)[0], "img-1"))
    flipped = bytearray(packet)
    flipped[-20] ^= 0x01  # a ciphertext bit
    with pytest.raises(SecurityError, match="packet for image 'img-1' failed authentication"):
        channel.receive(bytes(flipped), "img-1")
    edited = bytes(packet).replace(b'"levels": 5', b'"levels": 7')  # a header field (authenticated)
    with pytest.raises(SecurityError, match="failed authentication"):
        channel.receive(edited, "img-1")
    with pytest.raises(SecurityError, match="packet for image 'img-2' failed authentication"):
        channel.receive(bytes(packet), "img-2")  # replayed for another image


def test_wrong_key_is_named(channel: SecureChannel, tmp_path: Path) -> None:
    packet = channel.send(images(1)[0], "img-1")
    other = KeyRef(source="file", file=str(write_key_file(tmp_path / "other.key", SecretKey.generate())))
    with pytest.raises(SecurityError, match=r"encrypted under key id [0-9a-f]{16}, but key file .*other.key .*wrong key"):
        SecureChannel(channel.model, other).receive(packet, "img-1")


@pytest.mark.parametrize("cut, message", [(15, "truncated in the header length"), (30, "truncated in the header"),
                                          (-1, "envelope has .* 'envelope_bytes'")])
def test_truncated_packets_name_the_field(channel: SecureChannel, cut: int, message: str) -> None:
    packet = channel.send(images(1)[0], "img-1")
    with pytest.raises(DataError, match=f"packet for image 'img-1': .*{message}"):
        channel.receive(packet[:cut], "img-1")


def test_not_a_packet(channel: SecureChannel) -> None:
    with pytest.raises(DataError, match="not a medsec compressed packet"):
        channel.receive(b"\x89PNG\r\n\x1a\n" + bytes(64), "img-1")


def test_wrong_model_is_named(channel: SecureChannel, key_ref: KeyRef) -> None:
    packet = channel.send(images(1)[0], "img-1")
    with pytest.raises(DataError, match=r"'levels'/'latent_shape' say 5 levels and 4 latent channels; .* 6: wrong model"):
        SecureChannel(make_model(latent_channels=6), key_ref).receive(packet, "img-1")
    with pytest.raises(DataError, match="header field 'model' is [0-9a-f]{16}, this receiver's model is"):
        SecureChannel(make_model(seed=1), key_ref).receive(packet, "img-1")  # same shape, other weights


def test_passphrase_key_travels_as_scrypt_parameters(model: CompressiveAutoencoder,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAE_PASS", "correct horse battery staple")
    ref = {"source": "passphrase", "passphrase_env": "CAE_PASS"}
    packet = SecureChannel(model, ref).send(images(1)[0], "img-1")
    header, _, _ = read_header(packet)
    assert header["kdf"]["name"] == "scrypt" and b"correct horse" not in packet
    receiver = SecureChannel(model, ref)
    assert receiver.receive(packet, "img-1").shape == (1, 36, 44)
    monkeypatch.setenv("CAE_PASS", "wrong")
    with pytest.raises(SecurityError, match="wrong key"):
        SecureChannel(model, ref).receive(packet, "img-1")


def test_transmit_reports_rate_and_quality(channel: SecureChannel) -> None:
    clean = images(1, size=(32, 32))[0]
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    result = transmit(channel, noisy, "img-1", clean=clean)
    assert result.bpp == pytest.approx(8 * result.packet_bytes / (32 * 32))
    assert result.ratio == pytest.approx(8 / result.bpp)
    assert result.estimated_bpp < result.bpp and result.encode_ms > 0 and result.decode_ms > 0
    mse = float(((torch.round(result.received * 255) / 255 - clean) ** 2).mean())
    assert result.psnr == pytest.approx(-10 * math.log10(mse), rel=1e-4)
    assert -1 <= result.ssim <= 1


def test_jpeg_matching_finds_the_closest_rate() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    image = (0.5 + 0.3 * torch.sin(12 * xx) * torch.cos(9 * yy) + 0.05 * torch.rand(96, 96)).clamp(0, 1)[None]
    for target in (1.0, 2.0):
        match = jpeg_at_bpp(image, target)
        assert match.bpp == pytest.approx(target, rel=0.15)
        neighbours = [jpeg_encode(image, q).bpp for q in (match.quality - 1, match.quality + 1) if 1 <= q <= 95]
        assert all(abs(match.bpp - target) <= abs(bpp - target) for bpp in neighbours)
        assert match.decoded.shape == image.shape and match.num_bytes * 8 / 96**2 == pytest.approx(match.bpp)
    assert jpeg_at_bpp(image, 100.0).quality == 95  # out of reach: the best JPEG offered
