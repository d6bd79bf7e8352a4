"""FlashInfer attention backend (CUDA): paged prefill and decode wrappers reading the pool in place.

The pool's [num_pages, page_size, kv_heads, head_dim] tensors are FlashInfer's NHD layout, so
there is no copy: new K/V are scattered into their slots, then the wrappers attend over the pages.
"""

from __future__ import annotations

import torch

from adrenaline.attention.base import AttentionBackend
from adrenaline.core.batch import AttentionBatch
from adrenaline.kv_cache.pool import KVPool

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(pool, num_heads, num_kv_heads, head_dim)
        import flashinfer

        if pool.device.type != "cuda":
            raise ValueError(
                "the flashinfer attention backend needs a CUDA device; use --attention-backend torch"
            )
        ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)

    def plan(self, batch: AttentionBatch) -> None:
        ps = self.pool.page_size
        dev = self.pool.device
        pages_used = [(s + ps - 1) // ps for s in batch.seq_lens]
        indices = torch.tensor(
            [p for row, n in zip(batch.page_table, pages_used) for p in row[:n]], dtype=torch.int32
        )
        kv_indptr = torch.tensor([0, *pages_used], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        last_len = torch.tensor(
            [s - (n - 1) * ps for s, n in zip(batch.seq_lens, pages_used)], dtype=torch.int32
        )
        paged = (kv_indptr.to(dev), indices.to(dev), last_len.to(dev))
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, ps)
        common = dict(q_data_type=self.pool.dtype, kv_data_type=self.pool.dtype, sm_scale=self.scale)
        self.out_slots = batch.out_slots
        self.is_decode = batch.is_decode
        if self.is_decode:
            self._decode.plan(*paged, *dims, **common)
        else:
            qo_indptr = torch.tensor([0, *batch.extend_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self._prefill.plan(qo_indptr.to(dev), *paged, *dims, causal=True, **common)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(layer, self.out_slots, k, v)
        cache = (self.pool.k[layer], self.pool.v[layer])
        q = q.to(self.pool.dtype).contiguous()
        wrapper = self._decode if self.is_decode else self._prefill
        return wrapper.run(q, cache)
