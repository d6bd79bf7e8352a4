"""Decode side of attention offloading: a ``RemoteAttention`` over attention executors.

Once per step, before layer 0, each executor of the step's offloaded group gets the group's rooms
and lengths plus the rooms freed since (``begin``). Per layer, each gets its rows of the packed
q|k|v in one message (``submit``) while the local group's attention runs here, and its output
comes back (``wait``); outputs are concatenated in batch order. A missing or failed answer raises
``TransportError`` after ``timeout_s``: the scheduler then recomputes those requests locally.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from adrenaline.attention.base import AttentionBatch, RemoteAttention
from adrenaline.offload.protocol import ATTN_ERROR, ATTN_FREE, ATTN_OUT, ATTN_QKV, ATTN_STEP
from adrenaline.scheduler.request import Req
from adrenaline.transport.base import Message, PeerTimeout, Transport, TransportError


def room_of(req: Req) -> int:
    return req.extra["bootstrap"][2]


@dataclass
class _Group:
    executor: str
    start: int  # first row of the offloaded group (one row per request: decode tokens)
    rooms: list[int] = field(default_factory=list)


class OffloadClient(RemoteAttention):
    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.step = 0
        self.groups: list[_Group] = []
        self.frees: dict[str, list[int]] = defaultdict(list)
        self.executor_kv: dict[str, dict] = {}  # executor -> its last reported KV usage
        self.steps = 0

    # ---- the scheduler's calls ----------------------------------------------------------------
    def prepare(self, reqs: list[Req]) -> None:
        """The offloaded group of the next forward, in batch order (grouped by executor)."""
        self.groups = []
        for i, req in enumerate(reqs):
            if not self.groups or self.groups[-1].executor != req.offload:
                self.groups.append(_Group(req.offload, i))
            self.groups[-1].rooms.append(room_of(req))

    def free(self, req: Req) -> None:
        """Release a request's executor KV (sent with the next step, or by ``flush``)."""
        self.frees[req.offload].append(room_of(req))

    def flush(self) -> None:
        for executor, rooms in list(self.frees.items()):
            self._send(executor, ATTN_FREE, {"rooms": rooms})
        self.frees.clear()

    def _send(self, executor: str, kind: str, meta: dict, tensors: tuple = ()) -> None:
        try:
            self.transport.send(executor, kind, meta, tensors)
        except TransportError:
            pass  # the answer's timeout reports it

    # ---- RemoteAttention ----------------------------------------------------------------------
    def begin(self, batch: AttentionBatch) -> None:
        if not batch.is_decode:
            raise ValueError("offloaded requests only decode: their prompts were prefilled elsewhere")
        self.step += 1
        self.steps += 1
        for g in self.groups:
            meta = {
                "step": self.step,
                "rooms": g.rooms,
                "seq_lens": batch.seq_lens[g.start : g.start + len(g.rooms)],
                "frees": self.frees.pop(g.executor, []),
            }
            self._send(g.executor, ATTN_STEP, meta)

    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.device = q.device
        qkv = torch.cat([q, k, v], dim=1)  # one transfer per executor: [rows, H + 2 Hkv, D]
        for g in self.groups:
            rows = qkv[g.start : g.start + len(g.rooms)]
            self._send(g.executor, ATTN_QKV, {"step": self.step, "layer": layer}, (rows,))

    def wait(self, layer: int) -> torch.Tensor:
        outs = [self._answer(g.executor, layer) for g in self.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _answer(self, executor: str, layer: int) -> torch.Tensor:
        step = self.step

        def match(m: Message) -> bool:
            return (
                m.peer == executor
                and m.kind in (ATTN_OUT, ATTN_ERROR)
                and m.meta.get("step") == step
                and m.meta.get("layer") == layer
            )

        try:
            msg = self.transport.recv(match, self.timeout_s)
        except PeerTimeout as e:
            raise PeerTimeout(f"attention executor {executor} did not answer layer {layer}: {e}") from e
        if msg.kind == ATTN_ERROR:
            raise TransportError(f"attention executor {executor}: {msg.meta.get('message')}")
        if "stats" in msg.meta:
            self.executor_kv[executor] = msg.meta["stats"]
        return msg.tensors[0].to(self.device)
