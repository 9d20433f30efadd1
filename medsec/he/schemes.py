"""Homomorphic encryption schemes behind one interface, so that a command can put schemes side by
side on the same model and data. CKKS (TenSEAL/SEAL) is the one scheme today."""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

from medsec.core.registry import Named
from medsec.he.client import HEClient
from medsec.he.compiler import HEProgram, ModelCard, compile_model
from medsec.he.evaluator import MODES, HEServer


class HEScheme(Protocol):
    """What a scheme provides: a compiler (a trained network to an encrypted program), a client
    that holds the secret key, and a server that evaluates with public material only."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]

    def compile(self, net: nn.Module, calibration: torch.Tensor) -> HEProgram: ...

    def client(self, card: ModelCard, mode: str) -> HEClient: ...

    def server(self, program: HEProgram, public_context: bytes) -> HEServer: ...


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


SCHEMES: Named[type[HEScheme]] = Named("homomorphic scheme", "scheme")
SCHEMES.register(CKKS.name, CKKS)


def get_scheme(name: str) -> HEScheme:
    """The scheme registered under ``name`` (``scheme=...``)."""
    return SCHEMES[name]()
