"""Homomorphic encryption schemes behind one interface, so that a command can put schemes side by
side on the same model and data: CKKS (approximate reals) and BFV (exact integers), both on
TenSEAL/SEAL. (Paillier and secret sharing run other protocols: :mod:`medsec.he.paillier`,
:mod:`medsec.mpc.secret_sharing`.)"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from medsec.core.registry import Named
from medsec.errors import ConfigError
from medsec.he.bfv import BFVCard, BFVClient, BFVServer, QuantisedProgram, quantise
from medsec.he.client import HEClient
from medsec.he.compiler import HEProgram, ModelCard, compile_model
from medsec.he.evaluator import MODES, HEServer


class HEScheme(Protocol):
    """What a scheme provides: a compiler (a trained network to an encrypted program), a client
    that holds the secret key, and a server that evaluates with public material only."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]

    def compile(self, net: nn.Module, calibration: torch.Tensor) -> Any: ...

    def client(self, card: Any, mode: str) -> Any: ...

    def server(self, program: Any, public_context: bytes) -> Any: ...


class CKKS:
    """Approximate arithmetic on encrypted reals (Cheon-Kim-Kim-Song), through TenSEAL and SEAL."""

    name = "ckks"
    modes = MODES

    def compile(self, net: nn.Module, calibration: torch.Tensor) -> HEProgram:
        return compile_model(net, calibration)

    def client(self, card: ModelCard, mode: str) -> HEClient:
        return HEClient(card, mode)

    def server(self, program: HEProgram, public_context: bytes) -> HEServer:
        return HEServer(program, public_context)


class BFV:
    """Exact integer arithmetic (Brakerski/Fan-Vercauteren) on the he_cnn quantised to
    ``input_bits``-bit pixels and ``weight_bits``-bit weights (:mod:`medsec.he.bfv`)."""

    name = "bfv"
    modes = MODES

    def __init__(self, input_bits: int = 8, weight_bits: int = 6) -> None:
        self.input_bits, self.weight_bits = input_bits, weight_bits

    def compile(self, net: nn.Module, calibration: torch.Tensor) -> QuantisedProgram:
        return quantise(compile_model(net, calibration), self.input_bits, self.weight_bits)

    def client(self, card: BFVCard, mode: str) -> BFVClient:
        return BFVClient(card, mode)

    def server(self, program: QuantisedProgram, public_context: bytes) -> BFVServer:
        return BFVServer(program, public_context)


SCHEMES: Named[type[HEScheme]] = Named("homomorphic scheme", "scheme")
SCHEMES.register(CKKS.name, CKKS)
SCHEMES.register(BFV.name, BFV)


def get_scheme(name: str, **options: Any) -> HEScheme:
    """The scheme registered under ``name`` (``scheme=...``), with its options (``bfv.weight_bits``)."""
    scheme = SCHEMES[name]
    try:
        return scheme(**options)
    except TypeError as err:  # an option the scheme does not take
        raise ConfigError(f"{name}: {err}") from None
