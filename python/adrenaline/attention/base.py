"""Attention backend interface and the offload hook.

A forward pass plans attention once (``plan``) and then calls ``forward`` once per layer. The
batch handed to a backend may be only part of the model's batch: the decode scheduler of the
offloading design computes a *local* group here and has a ``RemoteAttention`` compute the
*offloaded* group elsewhere (see ``split.py``). Each request's attention runs wholly in one place,
so outputs merge by position, with no log-sum-exp combination.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from adrenaline.core.batch import AttentionBatch
from adrenaline.kv_cache.pool import KVPool

__all__ = ["AttentionBackend", "AttentionBatch", "RemoteAttention", "RemoteAttentionError"]


class AttentionBackend(ABC):
    """Paged attention over a ``KVPool``; writes the new tokens' K/V, then attends."""

    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    @abstractmethod
    def plan(self, batch: AttentionBatch) -> None:
        """Prepare index structures for this batch (once per forward, shared by all layers)."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the planned batch -> [T, H, D]."""


class RemoteAttentionError(RuntimeError):
    """The remote side could not compute its group's attention (dead, stalled or refusing)."""


class RemoteAttention(ABC):
    """Computes the attention of some requests elsewhere (the offload hook).

    ``submit`` must not block on the result: the local group's attention runs between it and
    ``wait``.
    """

    @abstractmethod
    def begin(self, batch: AttentionBatch) -> None:
        """Once per forward, before layer 0: which requests, their lengths, new slots."""

    @abstractmethod
    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ship the offloaded group's packed q/k/v for ``layer``."""

    @abstractmethod
    def wait(self, layer: int) -> torch.Tensor:
        """The offloaded group's attention output for ``layer``: [T_remote, H, D]; raises
        ``RemoteAttentionError`` when it cannot be had."""
