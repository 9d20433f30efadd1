"""Hand-made Flower messages and site updates shared by the encrypted-aggregation tests (CKKS,
Paillier): client mods and server strategies are called directly, without Ray."""
from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from medsec.models import small_cnn


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def instruction(kind: str, parameters: Parameters) -> Message:
    ins = FitIns(parameters, {}) if kind == MessageType.TRAIN else EvaluateIns(parameters, {})
    content = (compat.fitins_to_recorddict(ins, keep_input=True) if kind == MessageType.TRAIN
               else compat.evaluateins_to_recorddict(ins, keep_input=True))
    metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=metadata)  # no TaskIdentity outside a Flower runtime


def client(trained: list[np.ndarray], examples: int, seen: list) -> Callable[[Message, Context], Message]:
    """A ClientApp that records the parameters it is given and answers with ``trained``."""
    def call_next(msg: Message, ctxt: Context) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            seen.append(parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, True).parameters))
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained), examples, {})
            return Message(compat.fitres_to_recorddict(res, True), reply_to=msg)
        seen.append(parameters_to_ndarrays(compat.recorddict_to_evaluateins(msg.content, True).parameters))
        return Message(compat.evaluateres_to_recorddict(EvaluateRes(Status(Code.OK, ""), 0.5, examples, {})),
                       reply_to=msg)
    return call_next


def site_arrays(site: int, width: int = 8) -> list[np.ndarray]:
    """small_cnn(2, 1, 2, width)'s state dict as one site trained it: the weights moved, BatchNorm's
    ``num_batches_tracked`` (int64) counted."""
    torch.manual_seed(0)
    arrays = [value.numpy().copy() for value in small_cnn(2, 1, 2, width).state_dict().values()]
    rng = np.random.default_rng(site)
    return [a + rng.normal(0, 0.1, a.shape).astype(a.dtype) if a.dtype.kind == "f" else a + 7 * site + 3
            for a in arrays]


def compare(decrypted: list[np.ndarray], plain: list[np.ndarray]) -> float:
    """Largest |decrypted - plain| over the float arrays (integer arrays must equal plain rounded)."""
    worst = 0.0
    for got, want in zip(decrypted, plain):
        assert got.shape == want.shape
        if got.dtype.kind == "i":
            assert np.array_equal(got, np.rint(want).astype(got.dtype))
        else:
            worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
    return worst


EXAMPLES = (120, 75, 301)
SITES = ("hospital-a", "hospital-b", "hospital-c")


def encrypted_round(mod: Any, server: Any, arrays: Callable[[int], list[np.ndarray]]) -> dict:
    """One round: the three sites' replies (site i trained ``arrays(i + 1)``) through ``mod``, added
    by ``server``, and round 2's train message decrypted by ``mod``."""
    initial, replies, seen = arrays(0), [], []
    for index, (site, examples) in enumerate(zip(SITES, EXAMPLES)):
        out = mod(instruction(MessageType.TRAIN, ndarrays_to_parameters(initial)), context(),
                  client(arrays(index + 1), examples, seen))
        replies.append((SimpleNamespace(cid=site), compat.recorddict_to_fitres(out.content, True)))
    aggregated, _ = server.aggregate_fit(1, replies, [])
    received: list = []
    mod(instruction(MessageType.TRAIN, aggregated), context(), client(initial, 1, received))
    return {"initial": initial, "first_seen": seen, "replies": replies, "server": server, "aggregated": aggregated,
            "received": received[0], "mod": mod}
