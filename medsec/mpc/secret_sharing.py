"""Two-party additive secret sharing for inference of an HE-friendly network (a compiled he_cnn,
:class:`medsec.he.compiler.HEProgram`: affine layers and squares).

The client splits each image into two random shares, ``x = x0 + x1`` in the ring of a number system
(:mod:`medsec.mpc.arithmetic`: Z_2^64 with truncation, or an exact residue number system), and
sends one to each of two servers. The servers hold the model in the clear (the model owner runs both), evaluate
every affine layer on their own share locally, and every square with a Beaver pair ``(a, a^2)`` from
a dealer: they open ``e = x - a`` to each other (``e`` is uniform: it says nothing of ``x``) and
compute shares of ``x^2 = e^2 + 2ea + a^2``. Values are fixed point; in Z_2^64 each server
truncates its own share after each multiplication. The client adds the two logit shares.

Assumptions, said plainly: the two servers do not collude (together they can add the shares and
see the image); the dealer's pairs must be secret from the servers that use them. Here the client
is the dealer (the "client-aided" model): it learns nothing it did not have, and a server learns
only uniform values. A server is honest-but-curious: a malicious one can change the result.
"""
from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsec.core.layers import Layer, run_layers
from medsec.mpc.arithmetic import Arithmetic, ShareError, arithmetic_from

MAX_MESSAGE = 256 << 20
"""Largest message a party accepts (bytes)."""
MAX_BATCH = 4096
_HEADER = struct.Struct(">I")


@dataclass
class Program:
    """What the servers evaluate: the layers, the (C, H, W) input, the classes and the largest
    magnitude any layer produced on calibration images (what the fixed point must hold)."""

    layers: list[Layer]
    input_shape: tuple[int, ...]
    num_classes: int
    max_abs: float

    @classmethod
    def of(cls, compiled: Any) -> Program:
        """From a :class:`medsec.he.compiler.HEProgram` (the same layers; duck-typed, so that the
        servers never import the HE stack)."""
        return cls(list(compiled.layers),
                   tuple(compiled.input_shape), int(compiled.num_classes), float(compiled.max_abs))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation in float64 on ``[n, C*H*W]``: the reference."""
        return run_layers(self.layers, x)


def share(arithmetic: Arithmetic, v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two additive shares of ring elements ``v``: each alone is uniform."""
    first = arithmetic.random(v.shape, rng)
    return first, arithmetic.reduce(v - first)


# ---- the dealer ------------------------------------------------------------------------------
def square_widths(program: Program) -> list[int]:
    """The width of each square layer's input, in order."""
    widths, width = [], int(np.prod(program.input_shape))
    for layer in program.layers:
        if layer.kind == "affine":
            width = layer.matrix.shape[1]
        else:
            widths.append(width)
    return widths


def beaver_pairs(program: Program, arithmetic: Arithmetic, batch: int,
                 rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each server's shares of a Beaver pair ``(a, a^2)`` per square layer (a triple with a = b):
    ``[a_0, sq_0, a_1, sq_1, ...]`` for server 0 and server 1."""
    servers: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for width in square_widths(program):
        a = arithmetic.random((arithmetic.words, batch, width), rng)
        for value in (a, arithmetic.mul(a, a)):
            first, second = share(arithmetic, value, rng)
            servers[0].append(first)
            servers[1].append(second)
    return servers


# ---- a server's evaluation -------------------------------------------------------------------
@dataclass
class Party:
    """One server: its index, the program and the number system it computes in."""

    index: int
    program: Program
    arithmetic: Arithmetic

    def __post_init__(self) -> None:
        self.weights = self.arithmetic.weights(self.program)

    def evaluate(self, x: np.ndarray, pairs: Sequence[np.ndarray], peer: Channel) -> np.ndarray:
        """This party's share of the logits from its share ``x`` of the images."""
        ar, pairs, mine_only = self.arithmetic, list(pairs), self.index == 0
        for weights in self.weights:
            if weights is not None:
                matrix, bias = weights
                x = ar.reduce(np.matmul(x, matrix) + (bias if mine_only else 0))
            else:
                a, square = pairs.pop(0), pairs.pop(0)
                mine = ar.reduce(x - a)
                e = ar.reduce(mine + self.exchange(mine, peer))  # x - a: uniform, says nothing of x
                x = ar.reduce(2 * ar.mul(e, a) + square + (ar.mul(e, e) if mine_only else 0))
            x = ar.after(x, self.index)
        return x


    def exchange(self, mine: np.ndarray, peer: Channel) -> np.ndarray:
        """Send this party's opening and receive the other's: server 0 sends first, server 1 reads
        first, so that two large openings never wait on each other's full socket buffers."""
        if self.index == 0:
            peer.send({"opening": mine})
        theirs = self.arithmetic.check(peer.receive({"opening": mine.shape})["opening"], f"{peer.name}.opening")
        if self.index == 1:
            peer.send({"opening": mine})
        return theirs


# ---- messages ----------------------------------------------------------------------------------
class Channel:
    """Messages of named uint64 arrays over a socket: a length-prefixed JSON header (an error text,
    the arrays' names and shapes), then the length-prefixed bytes of the arrays. Counts bytes."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock, self.name = sock, name
        self.sent = self.received = 0

    def send(self, arrays: dict[str, np.ndarray], error: str | None = None) -> None:
        header = json.dumps({"error": error, "arrays": {k: list(v.shape) for k, v in arrays.items()}}).encode()
        body = b"".join(np.ascontiguousarray(v, dtype=np.uint64).tobytes() for v in arrays.values())
        message = _HEADER.pack(len(header)) + header + _HEADER.pack(len(body)) + body
        self.sock.sendall(message)
        self.sent += len(message)

    def _exactly(self, size: int, eof_ok: bool = False) -> bytes | None:
        chunks, left = [], size
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                if eof_ok and left == size:
                    return None
                raise ShareError(self.name, f"the connection closed with {left} of {size} bytes still expected")
            chunks.append(chunk)
            left -= len(chunk)
        self.received += size
        return b"".join(chunks)

    def _sized(self, what: str, eof_ok: bool = False) -> bytes | None:
        prefix = self._exactly(_HEADER.size, eof_ok)
        if prefix is None:
            return None
        (size,) = _HEADER.unpack(prefix)
        if size > MAX_MESSAGE:
            raise ShareError(f"{self.name}.{what}", f"{size} bytes is over the {MAX_MESSAGE} a message may take")
        return self._exactly(size)

    def header(self, eof_ok: bool = False) -> dict[str, list[int]] | None:
        """The next message's array shapes (``None``: the other side closed, when ``eof_ok``);
        raises the other side's error."""
        raw = self._sized("header", eof_ok)
        if raw is None:
            return None
        try:
            header = json.loads(raw)
            shapes, error = header["arrays"], header.get("error")
            if not isinstance(shapes, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError) as err:
            raise ShareError(f"{self.name}.header", f"not a message header ({type(err).__name__})") from None
        if error:
            self._sized("body")
            raise ShareError(self.name, f"refused: {error}")
        return shapes

    def arrays(self, shapes: dict[str, list[int]], expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The message's arrays, once their ``shapes`` (from :meth:`header`) are checked against
        ``expected``; the body is read either way, so the channel stays in step."""
        body = self._sized("body") or b""
        if sorted(shapes) != sorted(expected):
            raise ShareError(f"{self.name}.arrays", f"expected {sorted(expected)}, got {sorted(shapes)}")
        for name, want in expected.items():
            if shapes[name] != list(want):
                raise ShareError(f"{self.name}.{name}", f"shape {shapes[name]}, expected {list(want)}")
        size = 8 * sum(math.prod(want) for want in expected.values())
        if size != len(body):
            raise ShareError(f"{self.name}.body", f"{len(body)} bytes for arrays that take {size}")
        arrays, offset = {}, 0
        for name, want in expected.items():
            arrays[name] = np.frombuffer(body, dtype=np.uint64, count=math.prod(want), offset=offset).reshape(want)
            offset += 8 * math.prod(want)
        return arrays

    def receive(self, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        return self.arrays(self.header(), expected)


# ---- the two servers -------------------------------------------------------------------------
def save_program(program: Program, arithmetic: Arithmetic, path: Path) -> Path:
    """The program's layers and the number system as an ``.npz`` (no pickle): what both servers load."""
    arrays: dict[str, np.ndarray] = {"input_shape": np.array(program.input_shape), "max_abs": np.array(program.max_abs),
                                     "arithmetic": np.array(json.dumps(arithmetic.params())),
                                     "num_classes": np.array(program.num_classes),
                                     "kinds": np.array([layer.kind == "affine" for layer in program.layers])}
    for i, layer in enumerate(program.layers):
        if layer.kind == "affine":
            arrays[f"matrix{i}"], arrays[f"bias{i}"] = layer.matrix, layer.bias
    np.savez(path, **arrays)
    return path


def load_program(path: Path) -> tuple[Program, Arithmetic]:
    with np.load(path, allow_pickle=False) as data:
        layers = [Layer("affine", data[f"matrix{i}"], data[f"bias{i}"]) if affine else Layer("square")
                  for i, affine in enumerate(data["kinds"])]
        program = Program(layers, tuple(int(d) for d in data["input_shape"]), int(data["num_classes"]),
                          float(data["max_abs"]))
        return program, arithmetic_from(json.loads(str(data["arithmetic"])))


def batch_shapes(program: Program, words: int, batch: int) -> dict[str, tuple[int, ...]]:
    """What a server expects from the client for ``batch`` images: its image shares and its
    shares of a Beaver pair per square layer, each ``[words, batch, width]``."""
    pairs = [w for w in square_widths(program) for _ in range(2)]
    return {"x": (words, batch, int(np.prod(program.input_shape))),
            **{f"pair{i}": (words, batch, w) for i, w in enumerate(pairs)}}


def _listen(port: int) -> socket.socket:
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(120)
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(None)
    return conn


def _connect(port: int, timeout: float = 60.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve(program_path: Path, index: int, client_port: int, peer_port: int) -> None:
    """Server ``index``: connect to the other server (server 0 listens on ``peer_port``), then
    answer the client's batches on ``client_port`` until the client closes the connection. A
    malformed batch is answered with an error naming the field, and the server goes on."""
    program, arithmetic = load_program(program_path)
    party = Party(index, program, arithmetic)
    peer = Channel(_listen(peer_port) if index == 0 else _connect(peer_port), f"server{1 - index}")
    client = Channel(_listen(client_port), "client")
    while (shapes := client.header(eof_ok=True)) is not None:
        try:
            x = shapes.get("x")
            batch = x[1] if isinstance(x, list) and len(x) == 3 else None  # [words, batch, width]
            if not isinstance(batch, int) or not 0 < batch <= MAX_BATCH:
                client.arrays(shapes, {})  # reads the body; names the mismatch
                raise ShareError("client.x", f"a batch of 1 to {MAX_BATCH} images, got shape {x!r}")
            arrays = {name: arithmetic.check(value, f"client.{name}") for name, value in
                      client.arrays(shapes, batch_shapes(program, arithmetic.words, batch)).items()}
        except ShareError as err:
            client.send({}, error=str(err))
            continue
        pairs = [arrays[f"pair{i}"] for i in range(len(arrays) - 1)]
        client.send({"logits": party.evaluate(arrays["x"], pairs, peer)})


# ---- the client --------------------------------------------------------------------------------
class SecretSharedInference:
    """The client of two secret-sharing servers (and their dealer): shares images, sends each
    server its shares and Beaver pairs, adds the logit shares. Counts bytes."""

    def __init__(self, program: Program, arithmetic: Arithmetic, ports: Sequence[int], seed: int | None = None) -> None:
        self.program, self.arithmetic = program, arithmetic
        self.rng = np.random.default_rng(seed)
        self.servers = [Channel(_connect(port), f"server{i}") for i, port in enumerate(ports)]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``[n, classes]`` of ``[n, C, H, W]`` images in [0, 1]."""
        if tuple(images.shape[1:]) != tuple(self.program.input_shape):
            raise ShareError("images", f"shape {list(images.shape[1:])}, the model takes {list(self.program.input_shape)}")
        ar = self.arithmetic
        x = ar.encode_input(np.asarray(images, dtype=np.float64).reshape(len(images), -1))
        shares, pairs = share(ar, x, self.rng), beaver_pairs(self.program, ar, len(images), self.rng)
        for server, mine, own_pairs in zip(self.servers, shares, pairs, strict=True):
            server.send({"x": mine, **{f"pair{i}": p for i, p in enumerate(own_pairs)}})
        expected = {"logits": (ar.words, len(images), self.program.num_classes)}
        parts = [ar.check(server.receive(expected)["logits"], f"{server.name}.logits") for server in self.servers]
        return ar.decode(ar.reduce(parts[0] + parts[1]))

    @property
    def bytes_sent(self) -> int:
        return sum(server.sent + server.received for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.sock.close()


@contextmanager
def two_servers(program: Program, arithmetic: Arithmetic, work: Path,
                ports: Sequence[int]) -> Iterator[list[subprocess.Popen]]:
    """Both servers as separate processes on loopback (``ports``: client port of server 0, of
    server 1, and the servers' own port); stopped on leaving."""
    path = save_program(program, arithmetic, work / "program.npz")
    processes = [subprocess.Popen([sys.executable, "-m", "medsec.mpc.secret_sharing", str(path), str(index),
                                   str(ports[index]), str(ports[2])]) for index in (0, 1)]
    try:
        yield processes
    finally:
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medsec.mpc.secret_sharing PROGRAM.npz INDEX CLIENT_PORT PEER_PORT``: one server."""
    parser = argparse.ArgumentParser(prog="python -m medsec.mpc.secret_sharing", description=main.__doc__)
    parser.add_argument("program", type=Path)
    parser.add_argument("index", type=int, choices=(0, 1))
    parser.add_argument("client_port", type=int)
    parser.add_argument("peer_port", type=int)
    args = parser.parse_args(argv)
    serve(args.program, args.index, args.client_port, args.peer_port)


if __name__ == "__main__":
    main()
