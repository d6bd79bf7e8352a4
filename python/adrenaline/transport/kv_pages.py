"""The KV data plane: moving a prompt's computed KV pages to where the decode side placed them.

``KVPageMover`` is the one interface; the PD roles call it and never look at how pages travel.
Implementations: over a ``Transport`` (host memory over TCP, or NCCL; the PD role's
``disaggregation.kv_move.TransportPages``), one-sided into the receiver's registered pool
(``transport.mooncake_pages.MooncakePages``) and in place into a pool shared with a colocated
attention executor (``InPlacePages``: nothing crosses the network).

A one-sided mover needs the receiver's ``target`` (sent with the decode side's ask, connected by
the sender), reports on the receiving side which pages ``landed``, and fences a room the sender
will not write into again, so the receiver never reuses pages a late write could still hit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import msgspec
import torch

from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.base import TransportError


def gather_pages(pool: KVPool, pages: list[int]) -> torch.Tensor:
    """K and V of ``pages`` for every layer, packed as one [layers, 2, n, page, heads, dim] tensor."""
    idx = torch.tensor(pages, dtype=torch.long, device=pool.device)
    return torch.stack([torch.stack([k[idx], v[idx]]) for k, v in zip(pool.k, pool.v)])


def scatter_pages(pool: KVPool, pages: list[int], data: torch.Tensor) -> None:
    """Write a ``gather_pages`` tensor into ``pages`` of this pool."""
    idx = torch.tensor(pages, dtype=torch.long, device=pool.device)
    data = data.to(pool.device)
    for layer, (k, v) in enumerate(zip(pool.k, pool.v)):
        k[idx] = data[layer, 0]
        v[idx] = data[layer, 1]


class KVPageMover(ABC):
    one_sided = False  # pages land without messages: the receiver learns of them from ``landed``
    name = "tcp"

    def target(self) -> msgspec.Struct | None:
        """Receiving side: what a sender needs to write into this pool (None: it sends messages)."""
        return None

    def connect(self, peer: str, target: msgspec.Struct | None) -> None:
        """Sending side: how to reach ``peer``'s pool; TransportError when this mover cannot."""
        if target is not None:
            raise TransportError(
                f"the decode instance moves KV with a one-sided data plane, this prefill instance over "
                f"{self.name}: start both with the same --pd-transport"
            )

    def landed(self) -> list[tuple[int, int]]:
        """Receiving side: (room, pages of it landed) since the last call."""
        return []

    def fence(self, peer: str, room: int) -> None:  # noqa: B027 (nothing to fence for a message mover)
        """Sending side: no write into ``room``'s pages at ``peer`` follows this call."""

    def fenced(self) -> list[int]:
        """Receiving side: rooms fenced by their sender since the last call."""
        return []

    def close(self) -> None:  # noqa: B027 (most movers hold nothing)
        """Release what the mover registered."""

    @abstractmethod
    def move(self, peer: str, room: int, first: int, src: list[int], dst: list[int]) -> int:
        """Copy pages ``src`` of this instance's pool into pages ``dst`` (entries ``first`` on of
        the destination's list for ``room``); returns the bytes that crossed the network.
        ``TransportError`` when they could not be sent."""


class InPlacePages(KVPageMover):
    """Into a pool this process shares with an attention executor (shared memory, CUDA IPC)."""

    def __init__(self, src: KVPool, dst: KVPool) -> None:
        self.src, self.dst = src, dst

    def move(self, peer: str, room: int, first: int, src: list[int], dst: list[int]) -> int:
        scatter_pages(self.dst, dst, gather_pages(self.src, src))
        return 0
