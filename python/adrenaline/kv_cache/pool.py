"""KV storage: per layer, K and V tensors of shape [num_pages, page_size, kv_heads, head_dim].

That is FlashInfer's NHD paged layout, so the FlashInfer backend reads the pool in place; the
torch backend views it as a flat [slots, kv_heads, head_dim] token array (slot = page * page_size
+ offset).
"""

from __future__ import annotations

import torch

from adrenaline.model_config import ModelConfig


class KVPool:
    def __init__(
        self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> KVPool:
        """A pool over existing per-layer tensors (e.g. another process's shared pool)."""
        pool = cls.__new__(cls)
        pool.k, pool.v = list(k), list(v)
        pool.num_pages, pool.page_size = k[0].shape[0], k[0].shape[1]
        pool.dtype, pool.device = k[0].dtype, k[0].device
        return pool

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the K/V of tokens at ``slots``; ``index_copy_`` is ~15x faster than ``fk[slots] = k``
        on CPU (~40 us -> ~3 us per call, 60 calls per step)."""
        fk, fv = self.flat(layer)
        fk.index_copy_(0, slots, k.to(self.dtype))
        fv.index_copy_(0, slots, v.to(self.dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
