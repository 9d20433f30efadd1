"""Two-party additive secret sharing of the he_cnn: in Z_2^64 the result is the plaintext model's
within the fixed-point bound, in the residue number system it is the quantised model's exactly;
each server's view is uniform whatever the image; malformed messages are refused by name."""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from medsec.core.layers import Layer
from medsec.errors import ConfigError
from medsec.he.testing import free_port, tiny_program
from medsec.mpc import secret_sharing as ss
from medsec.mpc.arithmetic import RNS, Arithmetic, Ring64, ShareError
from medsec.mpc.secret_sharing import Program


@pytest.fixture(scope="module")
def tiny() -> tuple[Program, np.ndarray]:
    """The tiny compiled he_cnn and its 8 images as ``[n, C*H*W]`` float64."""
    _, compiled, images = tiny_program()
    return Program.of(compiled), images.reshape(len(images), -1).double().numpy()


def shared_logits(program: Program, arithmetic: Arithmetic, x: np.ndarray,
                  seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Both parties in this process (server 1 in a thread) over a socket pair; also what server 0
    is shown of server 1 (the openings)."""
    rng = np.random.default_rng(seed)
    shares = ss.share(arithmetic, arithmetic.encode_input(x), rng)
    pairs = ss.beaver_pairs(program, arithmetic, len(x), rng)
    sockets, out, seen = socket.socketpair(), {}, []

    class Recording(ss.Channel):
        def receive(self, expected):
            arrays = super().receive(expected)
            seen.append(arrays["opening"])
            return arrays

    def run(index: int, channel: ss.Channel) -> None:
        out[index] = ss.Party(index, program, arithmetic).evaluate(shares[index], pairs[index], channel)

    threads = [threading.Thread(target=run, args=(0, Recording(sockets[0], "server1")), daemon=True),
               threading.Thread(target=run, args=(1, ss.Channel(sockets[1], "server0")), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "the two parties wait on each other"
    return arithmetic.decode(arithmetic.reduce(out[0] + out[1])), seen


def uniform_p(values: np.ndarray, high: int = 2 ** 64) -> float:
    """Chi-square p-value of values in [0, high) against the uniform distribution (16 bins)."""
    bins = (values.ravel().astype(np.float64) / high * 16).astype(np.int64)
    return float(stats.chisquare(np.bincount(bins, minlength=16)).pvalue)


def test_ring64_inference_is_the_plaintext_model_within_the_fixed_point_bound(tiny) -> None:
    program, x = tiny
    ring = Ring64.plan(program)
    got, _ = shared_logits(program, ring, x)
    expected, bound = program.forward(x), ring.error_bound(program, x)
    assert np.all(np.abs(got - expected) <= bound), (np.abs(got - expected).max(), bound.min())
    assert ring.frac_bits == 14 and bound.max() < 0.01  # the bound says something (measured error 9e-5)


def test_the_bound_catches_a_wrong_computation(tiny) -> None:
    """Servers that drop the last bias land outside the bound."""
    program, x = tiny
    last = program.layers[-1]
    broken = Program([*program.layers[:-1], Layer("affine", last.matrix, np.zeros_like(last.bias))],
                     program.input_shape, program.num_classes, program.max_abs)
    ring = Ring64.plan(program)
    got, _ = shared_logits(broken, ring, x)
    assert np.any(np.abs(got - program.forward(x)) > ring.error_bound(program, x))


def test_rns_inference_is_the_quantised_model_exactly(tiny) -> None:
    program, x = tiny
    rns = RNS.plan(program, frac_bits=10)
    got, _ = shared_logits(program, rns, x)
    assert rns.words >= 3 and rns.modulus > 2 * program.max_abs * rns.final_scale
    assert np.array_equal(got, rns.reference(program, x))  # no truncation, nothing approximate
    assert np.abs(got - program.forward(x)).max() < 1e-2  # and the quantised model is the model


def test_openings_larger_than_the_socket_buffers_do_not_deadlock(tiny) -> None:
    """A full batch: each square's opening is megabytes, more than a socket buffer holds, so the
    parties must not both send before reading."""
    program, _ = tiny
    x = np.random.default_rng(4).random((ss.MAX_BATCH, int(np.prod(program.input_shape))))
    ring = Ring64.plan(program)
    got, openings = shared_logits(program, ring, x)
    assert openings[0].nbytes >= 1 << 20
    assert np.all(np.abs(got - program.forward(x)) <= ring.error_bound(program, x))


def test_truncating_shares_is_off_by_at_most_one_unit() -> None:
    ring, rng = Ring64(16), np.random.default_rng(1)
    values = rng.uniform(-1000, 1000, size=(1, 20000))
    first, second = ss.share(ring, Ring64(32).encode_input(values)[0][None], rng)
    got = ring.decode(ring.after(first, 0) + ring.after(second, 1))
    assert np.abs(got - values).max() <= 2.0 ** -16 * 1.5


@pytest.mark.parametrize("kind", ["ring64", "rns"])
def test_each_server_sees_uniform_values_whatever_the_image(tiny, kind: str) -> None:
    """A server's share of a black image and of a white one, and what it is shown of the other
    server during a square, are uniform: alone it cannot tell the images apart."""
    program, _ = tiny
    arithmetic = Ring64.plan(program) if kind == "ring64" else RNS.plan(program)
    high = 2 ** 64 if kind == "ring64" else min(arithmetic.moduli)
    size, rng = int(np.prod(program.input_shape)), np.random.default_rng(2)

    def view(v: np.ndarray) -> np.ndarray:  # one word per value (RNS: the first prime's residues)
        return v[0].view(np.uint64) if kind == "ring64" else v[-1]

    for party in (0, 1):
        views = [view(ss.share(arithmetic, arithmetic.encode_input(np.full((512, size), value)), rng)[party])
                 for value in (0.0, 1.0)]
        assert min(uniform_p(v, high) for v in views) > 1e-3
        assert stats.ks_2samp(*(v.ravel().astype(np.float64) for v in views)).pvalue > 1e-3
    _, openings = shared_logits(program, arithmetic, np.zeros((64, size)))
    assert all(uniform_p(view(opening), high) > 1e-3 for opening in openings)


def test_the_planners_refuse_what_does_not_fit(tiny) -> None:
    program, _ = tiny
    huge = Program(program.layers, program.input_shape, program.num_classes, max_abs=2.0 ** 30)
    with pytest.raises(ConfigError, match="fractional bits"):
        Ring64.plan(huge)
    assert RNS.plan(huge).words > RNS.plan(program).words  # RNS grows instead


def test_a_message_over_the_size_limit_is_refused_before_it_is_read() -> None:
    left, right = socket.socketpair()
    left.sendall(struct.pack(">I", ss.MAX_MESSAGE + 1))
    with pytest.raises(ShareError, match="server1.header: .* over the"):
        ss.Channel(right, "server1").header()


def test_a_residue_outside_its_prime_is_refused(tiny) -> None:
    rns = RNS.plan(tiny[0])
    bad = np.zeros((rns.words, 1, 3), dtype=np.int64)
    bad[1, 0, 2] = rns.moduli[1]
    with pytest.raises(ShareError, match="client.x: a residue outside"):
        rns.check(bad.view(np.uint64), "client.x")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ring64", "rns"])
def test_two_server_processes_on_loopback_answer_and_refuse_by_name(tiny, kind: str, tmp_path: Path) -> None:
    program, x = tiny
    arithmetic = Ring64.plan(program) if kind == "ring64" else RNS.plan(program)
    images = x.reshape(len(x), *program.input_shape)
    ports = [free_port() for _ in range(3)]
    with ss.two_servers(program, arithmetic, tmp_path, ports) as processes:
        client = ss.SecretSharedInference(program, arithmetic, ports[:2], seed=3)
        got = client.logits(images)
        expected = arithmetic.reference(program, x) if kind == "rns" else program.forward(x)
        tolerance = 0 if kind == "rns" else arithmetic.error_bound(program, x)
        assert np.all(np.abs(got - expected) <= tolerance)
        assert client.bytes_sent > 2 * x.size * 8 * arithmetic.words  # both servers' shares at least
        wrong = {name: np.zeros(shape[:2] + (5,) if name == "x" else shape, dtype=np.uint64)
                 for name, shape in ss.batch_shapes(program, arithmetic.words, 2).items()}
        for server in client.servers:  # a batch of the wrong image size: refused, named, nothing lost
            server.send(wrong)
            with pytest.raises(ShareError, match=r"refused: client.x: shape \[\d+, 2, 5\], expected \[\d+, 2, \d+\]"):
                server.receive({"logits": (arithmetic.words, 2, program.num_classes)})
        assert np.all(np.abs(client.logits(images) - expected) <= tolerance)  # still serving
        client.close()
    assert [p.returncode for p in processes] == [0, 0]
