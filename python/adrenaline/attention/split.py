"""One forward pass's attention: the local group through a backend, the rest through a remote.

Requests are ordered local-first, so each group is a contiguous token range and the merge is a
concatenation in batch order.
"""

from __future__ import annotations

import torch

from adrenaline.attention.base import AttentionBackend, AttentionBatch, RemoteAttention


class SplitAttention:
    def __init__(
        self,
        backend: AttentionBackend,
        batch: AttentionBatch,
        num_local: int | None = None,
        remote: RemoteAttention | None = None,
    ) -> None:
        """``num_local``: how many leading requests are computed here (all when None)."""
        n = len(batch.extend_lens) if num_local is None else num_local
        if n < len(batch.extend_lens) and remote is None:
            raise ValueError("offloaded requests need a RemoteAttention")
        rows = list(range(len(batch.extend_lens)))
        self.local = batch.select(rows[:n], 0) if n < len(rows) else batch
        self.t_local = self.local.num_tokens
        self.remote = remote if n < len(rows) else None
        self.backend = backend
        if self.remote is not None:
            self.remote.begin(batch.select(rows[n:], self.t_local))
        if n:
            backend.plan(self.local)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.remote is None:
            return self.backend.forward(layer, q, k, v)
        t = self.t_local
        self.remote.submit(layer, q[t:], k[t:], v[t:])
        parts = [self.backend.forward(layer, q[:t], k[:t], v[:t])] if t else []
        parts.append(self.remote.wait(layer))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
