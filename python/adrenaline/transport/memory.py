"""In-process transport: endpoints of one ``MemoryNetwork`` exchange messages through queues.

For tests and simulations of the PD and offload state machines without sockets or servers. The
network can hold back messages of a kind (to reorder or drop them), duplicate them, or cut an
endpoint off (a dead peer: what is sent to it vanishes). Thread-safe, so an executor may serve
from its own thread.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Sequence
from typing import Any

import torch

from adrenaline.transport.base import Message, Transport


class MemoryNetwork:
    def __init__(self) -> None:
        self.endpoints: dict[str, MemoryTransport] = {}
        self.held: list[tuple[str, Message]] = []  # (destination, message) held back
        self.hold_kinds: set[str] = set()
        self.duplicate_kinds: set[str] = set()
        self._ids = itertools.count()

    def endpoint(self) -> MemoryTransport:
        t = MemoryTransport(self, f"mem://{next(self._ids)}")
        self.endpoints[t.address] = t
        return t

    def deliver(self, peer: str, msg: Message) -> None:
        if msg.kind in self.hold_kinds:
            self.held.append((peer, msg))
            return
        dest = self.endpoints.get(peer)
        if dest is not None:
            for _ in range(2 if msg.kind in self.duplicate_kinds else 1):
                dest.inbox.put(msg)

    def release(self, kind: str | None = None) -> None:
        """Stop holding ``kind`` (all when None) and deliver what was held, in order."""
        self.hold_kinds = set() if kind is None else self.hold_kinds - {kind}
        held, self.held = self.held, []
        for peer, msg in held:
            self.deliver(peer, msg)

    def cut(self, address: str) -> None:
        """The endpoint dies: nothing reaches it any more."""
        self.endpoints.pop(address, None)


class MemoryTransport(Transport):
    def __init__(self, network: MemoryNetwork, address: str) -> None:
        super().__init__()
        self.network = network
        self.address = address
        self.inbox: queue.Queue[Message] = queue.Queue()

    def send(
        self, peer: str, kind: str, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        copies = [t.detach().clone() for t in tensors]  # as on a wire: the receiver owns its copy
        self.network.deliver(peer, Message(self.address, kind, dict(meta or {}), copies))
        nbytes = sum(t.numel() * t.element_size() for t in copies)
        self.stats.bytes_sent += nbytes
        self.stats.messages_sent += 1
        return nbytes

    def _receive(self, timeout_s: float) -> Message | None:
        try:
            msg = self.inbox.get(timeout=timeout_s) if timeout_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None
        self.stats.messages_received += 1
        self.stats.bytes_received += sum(t.numel() * t.element_size() for t in msg.tensors)
        return msg

    def disconnect(self, peer: str) -> None: ...

    def lost(self, peer: str) -> bool:
        return peer not in self.network.endpoints  # cut: a dead process

    def peers(self) -> list[str]:
        return []

    def close(self) -> None:
        self.network.cut(self.address)
