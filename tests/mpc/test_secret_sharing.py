"""Two-party additive secret sharing of the he_cnn: the result is the plaintext model's within the
fixed-point bound, each server's view is uniform whatever the image, and malformed messages are
refused by name."""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from medsec.errors import ConfigError
from medsec.he.testing import free_port, tiny_program
from medsec.mpc import secret_sharing as ss
from medsec.mpc.secret_sharing import Layer, Program


def flat(images) -> np.ndarray:
    return images.reshape(len(images), -1).double().numpy()


def shared_logits(program: Program, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Both parties in this process (server 1 in a thread) over a socket pair; also each party's openings."""
    frac, rng = ss.plan_fraction_bits(program), np.random.default_rng(seed)
    shares, pairs = ss.share(ss.encode(x, frac), rng), ss.beaver_pairs(program, len(x), rng)
    sockets, out, seen = socket.socketpair(), {}, []

    class Recording(ss.Channel):
        def receive(self, expected):  # what server 0 learns from server 1
            arrays = super().receive(expected)
            seen.append(arrays["opening"])
            return arrays

    def run(index: int, channel: ss.Channel) -> None:
        out[index] = ss.Party(index, program, frac).evaluate(shares[index], pairs[index], channel)

    thread = threading.Thread(target=run, args=(1, ss.Channel(sockets[1], "server0")))
    thread.start()
    run(0, Recording(sockets[0], "server1"))
    thread.join()
    return ss.decode(out[0] + out[1], frac), seen


def uniform_p(values: np.ndarray) -> float:
    """Chi-square p-value of the top 4 bits of uint64 values against the uniform distribution."""
    counts = np.bincount((values.ravel() >> np.uint64(60)).astype(np.int64), minlength=16)
    return float(stats.chisquare(counts).pvalue)


def test_shared_inference_is_the_plaintext_model_within_the_fixed_point_bound() -> None:
    _, compiled, images = tiny_program()
    program = Program.of(compiled)
    x = flat(images)
    got, _ = shared_logits(program, x)
    expected, bound = program.forward(x), ss.error_bound(program, ss.plan_fraction_bits(program), x)
    assert np.all(np.abs(got - expected) <= bound), (np.abs(got - expected).max(), bound.min())
    assert bound.max() < 0.01  # 14 fractional bits: the bound says something (measured error 9e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_missing_bias_or_square_is_caught_by_the_bound() -> None:
    """The bound is tight enough to fail a wrong computation (here: the servers' program without
    its last bias)."""
    _, compiled, images = tiny_program()
    program = Program.of(compiled)
    x = flat(images)
    broken = Program([*program.layers[:-1], Layer("affine", program.layers[-1].matrix,
                                                    np.zeros_like(program.layers[-1].bias))],
                       program.input_shape, program.num_classes, program.max_abs)
    got, _ = shared_logits(broken, x)
    assert np.any(np.abs(got - program.forward(x)) > ss.error_bound(program, ss.plan_fraction_bits(program), x))


def test_truncating_shares_is_off_by_at_most_one_unit() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(-1000, 1000, size=20000)
    first, second = ss.share(ss.encode(values, 32), rng)  # scale 2^32, truncated by 16 bits
    got = ss.decode(ss.truncate(first, 0, 16) + ss.truncate(second, 1, 16), 16)
    assert np.abs(got - values).max() <= 2.0 ** -16 * 1.5


def test_each_server_sees_uniform_values_whatever_the_image() -> None:
    """A server's share of a black image and of a white one, and what it is shown of the other
    server during a square, are uniform: alone it cannot tell the images apart."""
    program = Program.of(tiny_program()[1])
    size, frac = int(np.prod(program.input_shape)), ss.plan_fraction_bits(program)
    rng = np.random.default_rng(2)
    black, white = np.zeros((512, size)), np.ones((512, size))
    for party in (0, 1):
        views = [ss.share(ss.encode(image, frac), rng)[party] for image in (black, white)]
        assert min(uniform_p(view) for view in views) > 1e-3
        as_unit = [view.ravel().astype(np.float64) / 2.0 ** 64 for view in views]
        assert stats.ks_2samp(*as_unit).pvalue > 1e-3
    _, openings = shared_logits(program, black[:64])
    assert all(uniform_p(opening) > 1e-3 for opening in openings)


def test_the_planner_refuses_a_model_whose_values_do_not_fit_the_ring() -> None:
    program = Program.of(tiny_program()[1])
    huge = Program(program.layers, program.input_shape, program.num_classes, max_abs=2.0 ** 30)
    with pytest.raises(ConfigError, match="fractional bits"):
        ss.plan_fraction_bits(huge)


def test_a_message_over_the_size_limit_is_refused_before_it_is_read() -> None:
    left, right = socket.socketpair()
    left.sendall(struct.pack(">I", ss.MAX_MESSAGE + 1))
    with pytest.raises(ss.ShareError, match="server1.header: .* over the"):
        ss.Channel(right, "server1").header()


@pytest.mark.slow
def test_two_server_processes_on_loopback_answer_and_refuse_by_name(tmp_path: Path) -> None:
    _, compiled, images = tiny_program()
    program = Program.of(compiled)
    ports = [free_port() for _ in range(3)]
    with ss.two_servers(program, tmp_path, ports) as processes:
        client = ss.SecretSharedInference(program, ports[:2], seed=3)
        got = client.logits(images.numpy())
        bound = ss.error_bound(program, ss.plan_fraction_bits(program), flat(images))
        assert np.all(np.abs(got - program.forward(flat(images))) <= bound)
        assert client.bytes_sent > 2 * images.numel() * 8  # both servers' shares at least
        wrong = {name: np.zeros((2, 5) if name == "x" else shape, dtype=np.uint64)
                 for name, shape in ss.batch_shapes(program, 2).items()}
        for server in client.servers:  # a batch of the wrong image size: refused, named, nothing lost
            server.send(wrong)
            with pytest.raises(ss.ShareError, match=r"refused: client.x: shape \[2, 5\], expected \[2, \d+\]"):
                server.receive({"logits": (2, program.num_classes)})
        assert np.allclose(client.logits(images.numpy()), got, atol=2 * bound.max())  # still serving
        client.close()
    assert [p.returncode for p in processes] == [0, 0]
