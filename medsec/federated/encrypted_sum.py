"""What encrypted aggregation schemes share (CKKS in :mod:`~medsec.federated.he_aggregation`, Paillier
in :mod:`~medsec.federated.paillier_aggregation`): the plain header of encrypted parameters, the
client mod that decrypts the global model and encrypts the site's weighted update, and the server
strategy that adds the sites' ciphertexts and their example counts.

The header is JSON ``{"format", "examples", "arrays": [{"shape", "dtype"}, ...]}``, bounded (at most
``MAX_ARRAYS`` arrays, ``MAX_VALUES`` values, ``MAX_HEADER_BYTES`` bytes); each scheme names its
``format`` and ``Parameters.tensor_type``.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from medsec.errors import ConfigError
from medsec.he.wire import HEInputError

DTYPES = ("float16", "float32", "float64", "int32", "int64")
"""Array dtypes carried; integer arrays (BatchNorm's ``num_batches_tracked``) are rounded back."""
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 10_000
MAX_DIMS = 8
MAX_VALUES = 1 << 27
"""At most 134 million parameters per model."""
MAX_EXAMPLES = 1 << 40


@dataclass(frozen=True)
class Header:
    """What the plain header of encrypted parameters says."""

    format: str
    examples: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def layout(self) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
        return self.shapes, self.dtypes

    @property
    def values(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def to_bytes(self) -> bytes:
        arrays = [{"shape": list(shape), "dtype": dtype} for shape, dtype in zip(self.shapes, self.dtypes)]
        return json.dumps({"format": self.format, "examples": self.examples, "arrays": arrays},
                          separators=(",", ":")).encode()

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """``flat`` cut into the header's arrays; integer arrays are rounded."""
        out, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            part = flat[start:start + math.prod(shape)].reshape(shape)
            start += part.size
            out.append((np.rint(part) if dtype.startswith("int") else part).astype(dtype))
        return out


def check_header(obj: Any, field: str, fmt: str, scheme: str) -> Header:
    """A :class:`Header` of format ``fmt`` from a decoded JSON value, every field checked and bounded."""
    if not isinstance(obj, dict) or set(obj) != {"format", "examples", "arrays"}:
        raise HEInputError(field, f"not a medsec {scheme} header (a JSON object with 'format', 'examples', 'arrays')")
    if obj["format"] != fmt:
        raise HEInputError(field, f"format must be {fmt!r}, got {str(obj['format'])[:40]!r}")
    examples = obj["examples"]
    if type(examples) is not int or not 1 <= examples <= MAX_EXAMPLES:
        raise HEInputError(field, f"examples must be an integer from 1 to {MAX_EXAMPLES}, got {str(examples)[:40]}")
    arrays = obj["arrays"]
    if not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
        raise HEInputError(field, f"arrays must be a list of at most {MAX_ARRAYS} entries")
    shapes, dtypes, total = [], [], 0
    for index, entry in enumerate(arrays):
        where = f"{field} arrays[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise HEInputError(where, "must be an object with 'shape' and 'dtype'")
        shape, dtype = entry["shape"], entry["dtype"]
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or any(type(size) is not int or size < 0 for size in shape)):
            raise HEInputError(where, f"shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise HEInputError(where, f"dtype must be one of {list(DTYPES)}, got {str(dtype)[:40]!r}")
        total += math.prod(shape)
        if total > MAX_VALUES:
            raise HEInputError(where, f"more than {MAX_VALUES} values in all")
        shapes.append(tuple(shape))
        dtypes.append(dtype)
    return Header(fmt, examples, tuple(shapes), tuple(dtypes))


def parse_header(blob: bytes, field: str, fmt: str, scheme: str) -> Header:
    """:func:`check_header` of the JSON bytes ``blob``, its size bounded first."""
    if len(blob) > MAX_HEADER_BYTES:
        raise HEInputError(field, f"header of {len(blob)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, too long an integer
        raise HEInputError(field, f"not a medsec {scheme} header (not UTF-8 JSON)") from None
    return check_header(obj, field, fmt, scheme)


def header_of(arrays: Sequence[np.ndarray], examples: int, fmt: str, scheme: str) -> Header:
    """The checked header of a site's ``arrays`` and example count."""
    entries = [{"shape": list(a.shape), "dtype": a.dtype.name} for a in arrays]
    return check_header({"format": fmt, "examples": examples, "arrays": entries}, "parameters", fmt, scheme)


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All values of ``arrays`` in one float64 vector."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] or [np.zeros(0)])


def header_and_payload(parameters: Parameters, tensor_type: str, fmt: str, scheme: str,
                       field: str) -> tuple[Header, list[bytes]]:
    """The checked header of encrypted ``parameters`` and the tensors after it; errors name ``field``."""
    if parameters.tensor_type != tensor_type:
        raise HEInputError(field, f"tensor_type {parameters.tensor_type[:40]!r}, not {tensor_type!r}: plain "
                                  f"parameters (every site needs the {scheme} client mod)")
    if not parameters.tensors:
        raise HEInputError(field, "no header")
    return parse_header(parameters.tensors[0], f"{field}[0]", fmt, scheme), list(parameters.tensors[1:])


class EncryptionMod(ABC):
    """A Flower client mod: decrypts the global parameters of train and evaluate messages with the
    sites' secret key (or the path of its file, loaded on first use and never pickled) and encrypts
    the train reply's parameters, weighted by its ``num_examples``. Round 1's plain model passes."""

    name: ClassVar[str]
    tensor_type: ClassVar[str]
    key_type: ClassVar[type]

    def __init__(self, key: Any) -> None:
        given = isinstance(key, self.key_type)
        self._path = None if given else Path(key)
        self._key = key if given else None
        if self._key is not None:
            self.check_key(self._key)

    def __getstate__(self) -> dict:
        return {"_path": self._path, "_key": None if self._path else self._key}

    def __repr__(self) -> str:
        return f"{self.name}({'key file' if self._path else 'key in memory'})"

    @property
    def key(self) -> Any:
        if self._key is None:
            self._key = self.load_key(self._path)
        return self._key

    def check_key(self, key: Any) -> None:
        """Refuse a key that cannot decrypt (every key of ``key_type`` can, unless overridden)."""

    @abstractmethod
    def load_key(self, path: Path) -> Any:
        """The sites' secret key from its file."""

    @abstractmethod
    def encrypt(self, arrays: list[np.ndarray], examples: int) -> Parameters:
        """The site's arrays times ``examples``, encrypted with their header."""

    @abstractmethod
    def decrypt(self, parameters: Parameters) -> list[np.ndarray]:
        """Plain arrays (divided by the header's example count) from encrypted parameters."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, ctxt)
        key = "fitins.parameters" if kind == MessageType.TRAIN else "evaluateins.parameters"
        parameters = arrayrecord_to_parameters(self._array_record(msg.content, key), keep_input=True)
        if parameters.tensor_type == self.tensor_type:  # round 1's initial model comes in the clear
            arrays = self.decrypt(parameters)
            msg.content.array_records[key] = parameters_to_arrayrecord(ndarrays_to_parameters(arrays), False)
        out = call_next(msg, ctxt)
        if kind == MessageType.TRAIN and not out.has_error():
            plain = arrayrecord_to_parameters(self._array_record(out.content, "fitres.parameters"), keep_input=True)
            examples = out.content.metric_records["fitres.num_examples"]["num_examples"]
            encrypted = self.encrypt(parameters_to_ndarrays(plain), examples)
            out.content.array_records["fitres.parameters"] = parameters_to_arrayrecord(encrypted, False)
        return out

    def _array_record(self, content: RecordDict, key: str) -> Any:
        if key not in content.array_records:
            raise ConfigError(f"{self.name}: the message has no '{key}' record; {self.name} works with legacy "
                              "(Client / NumPyClient) ClientApps")
        return content.array_records[key]


class EncryptedSum(Strategy, ABC):
    """Wraps a FedAvg strategy: its ``aggregate_fit`` adds the sites' encrypted, weighted parameters
    (and their example counts); configuration and evaluation are the wrapped strategy's.
    Centralised evaluation is refused: the server never has the model in the clear."""

    scheme: ClassVar[str]
    max_examples: ClassVar[int] = MAX_EXAMPLES
    """The largest total example count the sum can carry."""

    def __init__(self, strategy: FedAvg) -> None:
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_fit is not FedAvg.aggregate_fit:
            raise ConfigError(f"federation.strategy: {self.scheme} aggregation computes FedAvg's weighted mean; "
                              f"{type(strategy).__name__} aggregates otherwise (it needs the updates in the clear)")
        if strategy.evaluate_fn is not None:
            raise ConfigError(f"federation: centralised evaluation (evaluate_fn) needs the global model in the "
                              f"clear, which the server never has with {self.scheme} aggregation; evaluate on the sites")
        self.strategy = strategy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    @abstractmethod
    def load(self, parameters: Parameters, field: str) -> tuple[Header, Any]:
        """The header and checked ciphertexts of a site's ``parameters``; errors name ``field``."""

    @abstractmethod
    def add(self, total: Any, other: Any) -> Any:
        """The ciphertexts of the sum."""

    @abstractmethod
    def parameters(self, header: Header, total: Any) -> Parameters:
        """The aggregate as encrypted parameters."""

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The encrypted sum of the sites' weighted parameters, with the sum of their example counts
        in its header; a site whose ciphertexts are malformed, oversized or do not match the
        others' is refused with an error naming it."""
        if not results or (failures and not self.strategy.accept_failures):
            return None, {}
        reference: tuple[str, Header] | None = None
        total: Any = None
        for proxy, res in results:
            site = f"site {proxy.cid}"
            header, ciphertexts = self.load(res.parameters, f"{site} parameters")
            if header.examples != res.num_examples:
                raise HEInputError(site, f"its header says {header.examples} examples, num_examples is "
                                         f"{res.num_examples}")
            if reference is None:
                reference, total = (proxy.cid, header), ciphertexts
                continue
            if header.layout != reference[1].layout:
                raise HEInputError(site, f"its parameters' shapes or dtypes differ from site {reference[0]}'s")
            total = self.add(total, ciphertexts)
        examples = sum(res.num_examples for _, res in results)
        if examples > self.max_examples:
            raise HEInputError("sites", f"{examples} examples in all, more than the {self.max_examples} the "
                                        f"{self.scheme} sum carries")
        parameters = self.parameters(replace(reference[1], examples=examples), total)
        metrics: dict[str, Scalar] = {}
        if self.strategy.fit_metrics_aggregation_fn:
            metrics = self.strategy.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
        return parameters, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation: the server cannot evaluate an encrypted model."""
        return None
