"""The transport interface shared by PD KV transfer and the per-layer attention exchange.

A transport is one endpoint with an address peers can reach. Messages carry a kind, a small
metadata dict and a list of tensors. There is no fixed world: peers are connected lazily on first
send and dropped with ``disconnect``, so a dead peer costs its own requests a timeout and nothing
more. Where the connection shows that a peer is gone (its process exited: the kernel closed its
socket), ``lost`` says so, and a ``recv`` watching that peer fails at once instead of timing out.
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def reachable_host(host: str) -> str:
    """An address peers can dial for a server bound to ``host`` (0.0.0.0 -> this machine's IP)."""
    if host in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return "127.0.0.1" if host == "localhost" else host


def to_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def from_bytes(buf: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    out.view(-1).view(torch.uint8).numpy()[:] = buf
    return out


class TransportError(RuntimeError):
    """A message could not be sent or received."""


class PeerTimeout(TransportError):
    """No matching message arrived in time: the peer is dead, slow or gone."""


class PeerLost(TransportError):
    """The peer's connection closed: it will not answer."""


WATCH_SLICE_S = 0.05  # how often a ``recv`` watching a peer looks at its connection while idle


@dataclass
class Message:
    peer: str  # the sender's address: reply to it
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


class Transport(ABC):
    address: str  # where peers reach this endpoint

    def __init__(self) -> None:
        self.stats = TransportStats()
        self._stash: deque[Message] = deque()  # received while waiting for something else

    @abstractmethod
    def send(
        self, peer: str, kind: str, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        """Queue a message to ``peer`` without waiting for it; returns the tensor bytes sent."""

    @abstractmethod
    def _receive(self, timeout_s: float) -> Message | None:
        """The next message from the wire, or None after ``timeout_s``."""

    @abstractmethod
    def disconnect(self, peer: str) -> None:
        """Drop the connection to ``peer`` and anything still queued for it."""

    @abstractmethod
    def close(self) -> None: ...

    def lost(self, peer: str) -> bool:
        """Whether ``peer``'s connection closed after it was up (default: never known)."""
        return False

    def poll(self, timeout_s: float = 0.0) -> Message | None:
        """The next message from any peer (stashed ones first), or None after ``timeout_s``."""
        if self._stash:
            return self._stash.popleft()
        return self._receive(timeout_s)

    def recv(self, match: Callable[[Message], bool], timeout_s: float, watch: str | None = None) -> Message:
        """Wait for the first message ``match`` accepts; others are kept for ``poll``. ``watch``:
        the peer that answers; ``PeerLost`` as soon as its connection is seen closed."""
        for i, msg in enumerate(self._stash):
            if match(msg):
                del self._stash[i]
                return msg
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            msg = self._receive(left if watch is None else min(left, WATCH_SLICE_S))
            if msg is None:
                if watch is not None and self.lost(watch):
                    raise PeerLost(f"{watch} closed its connection")
                if time.monotonic() < deadline:
                    continue
                raise PeerTimeout(f"no reply within {timeout_s:.1f} s")
            if match(msg):
                return msg
            self._stash.append(msg)
