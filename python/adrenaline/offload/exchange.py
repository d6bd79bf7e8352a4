"""The per-layer attention exchange, decode side: the data path between a decode instance and
its attention executors, apart from the control (which requests, policy, failures).

``AttentionExchange`` is the interface: begin a step with its metadata, submit a layer's packed
q|k|v, wait for a group's output, queue frees, close. ``TransportExchange`` runs it over a
``Transport`` (ZeroMQ host memory, or NCCL); ``ShmExchange`` (``offload/shm.py``) moves the data of
executors on this host onto shared memory and leaves the others here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adrenaline.attention.base import RemoteAttentionError
from adrenaline.offload.protocol import (
    OFFLOAD,
    OFFLOAD_VERSION,
    AttnError,
    AttnFree,
    AttnOut,
    AttnQKV,
    AttnStep,
)
from adrenaline.transport.base import Message, Transport, TransportError


@dataclass
class Group:
    """The rows of one step's offloaded group that one executor computes."""

    executor: str
    start: int  # first row (one row per request: decode tokens)
    rooms: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)


class AttentionExchange(ABC):
    def __init__(self) -> None:
        self.executor_pages: dict[str, tuple[int, int]] = {}  # executor -> last (used, total) pages
        self.executor_s = 0.0  # the executor's compute time for the output ``wait`` last returned

    @abstractmethod
    def begin(self, step: int, groups: Sequence[Group], frees: dict[str, list[int]]) -> None:
        """Announce a step to each group's executor, with the rooms freed since the last one."""

    @abstractmethod
    def submit(self, step: int, layer: int, groups: Sequence[Group], q: Tensor, k: Tensor, v: Tensor) -> None:
        """Ship each group's rows of q [rows, H, D], k and v [rows, Hkv, D]; must not block."""

    @abstractmethod
    def wait(self, step: int, layer: int, group: Group, timeout_s: float) -> torch.Tensor:
        """The group's [rows, H, D] output; ``RemoteAttentionError`` when it cannot be had."""

    @abstractmethod
    def free(self, executor: str, rooms: list[int]) -> None:
        """Release rooms outside a step."""

    @abstractmethod
    def close(self) -> None:
        """Release what the data path holds."""

    def info(self) -> dict:
        """Which path carries each executor's per-layer data (``/server_info``)."""
        return {"kind": "tcp"}

    def gone(self, executor: str) -> bool:
        """Whether the executor's process is known to have exited (its connection closed)."""
        return False


class TransportExchange(AttentionExchange):
    def __init__(self, transport: Transport) -> None:
        super().__init__()
        self.transport = transport

    def _send(self, executor: str, msg, tensors: tuple = ()) -> None:
        if self.gone(executor):
            return  # its pages went with it
        try:
            OFFLOAD.send(self.transport, executor, msg, tensors)
        except TransportError:
            pass  # the answer's timeout reports it

    def begin(self, step: int, groups: Sequence[Group], frees: dict[str, list[int]]) -> None:
        for g in groups:
            msg = AttnStep(OFFLOAD_VERSION, step, g.rooms, g.seq_lens, frees.pop(g.executor, []))
            self._send(g.executor, msg)

    def submit(self, step: int, layer: int, groups: Sequence[Group], q: Tensor, k: Tensor, v: Tensor) -> None:
        qkv = torch.cat([q, k, v], dim=1)  # one transfer per executor: [rows, H + 2 Hkv, D]
        for g in groups:
            self._send(g.executor, AttnQKV(step, layer), (qkv[g.start : g.start + len(g.rooms)],))

    def wait(self, step: int, layer: int, group: Group, timeout_s: float) -> torch.Tensor:
        def match(m: Message) -> bool:
            if m.peer != group.executor or m.kind not in (AttnOut.__name__, AttnError.__name__):
                return False
            return m.meta.get("step") == step and m.meta.get("layer") == layer

        try:
            msg = self.transport.recv(match, timeout_s, watch=group.executor)
        except TransportError as e:
            self.executor_pages.pop(group.executor, None)
            raise RemoteAttentionError(
                f"attention executor {group.executor} did not answer layer {layer}: {e}"
            ) from e
        answer = OFFLOAD.parse(msg)
        if isinstance(answer, AttnError):
            raise RemoteAttentionError(f"attention executor {group.executor}: {answer.message}")
        self.executor_pages[group.executor] = (answer.used_pages, answer.num_pages)
        self.executor_s = answer.attend_us * 1e-6
        return msg.tensors[0]

    def free(self, executor: str, rooms: list[int]) -> None:
        self._send(executor, AttnFree(rooms))

    def gone(self, executor: str) -> bool:
        return self.transport.lost(executor)

    def close(self) -> None:
        """Nothing: the transport is the PD role's, closed with it."""
