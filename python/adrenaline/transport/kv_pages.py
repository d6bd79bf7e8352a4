"""The KV data plane: moving a prompt's computed KV pages to where the decode side placed them.

``KVPageMover`` is the one interface; the PD prefill role calls it and never looks at how pages
travel. Implementations: over a ``Transport`` (host memory over TCP, or NCCL; the PD role's
``disaggregation.kv_move.TransportPages``) and in place into a pool shared with a colocated
attention executor (``InPlacePages``: nothing crosses the network).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from adrenaline.kv_cache.pool import KVPool


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
