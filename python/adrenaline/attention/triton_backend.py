"""Triton attention backend: decode batches through the Triton kernels (``sgl_kernel_ext.triton_decode``),
batches with a prefill chunk through the torch backend.

The GPU backend where FlashInfer is absent, and the attention executor's: the executor serves only
decode batches. A decode batch's plan (``DecodePlan``) is a few tensors the kernels read on the
device, so a CUDA graph captures ``forward_decode`` over a static plan that each replay refills
(``runner/cuda_graph.py``). On CPU the kernels run in Triton's interpreter (tests only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline.attention.base import AttentionBackend, AttentionBatch
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.kv_cache.pool import KVPool
from sgl_kernel_ext.triton_ops import interpreting


@dataclass
class DecodePlan:
    """What the decode kernels read: page table [B, W] int32, KV lengths [B] int32, new tokens'
    slots [B] int64. Rows past the batch are padding: length 0, slot -1 (no write, zero output)."""

    page_idx: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor
    num_splits: int

    @classmethod
    def build(
        cls, batch: AttentionBatch, page_size: int, num_splits: int, rows: int | None = None, width: int = 1
    ) -> DecodePlan:
        """On the host, padded to ``rows`` rows and at least ``width`` pages."""
        b = len(batch.seq_lens)
        rows = b if rows is None else rows
        width = max([width, *(-(-s // page_size) for s in batch.seq_lens)])
        idx = torch.zeros(rows, width, dtype=torch.int32)
        for r, (pages, s) in enumerate(zip(batch.page_table, batch.seq_lens)):
            n = -(-s // page_size)
            idx[r, :n] = torch.tensor(pages[:n], dtype=torch.int32)
        lens = torch.zeros(rows, dtype=torch.int32)
        lens[:b] = torch.tensor(batch.seq_lens, dtype=torch.int32)
        slots = torch.full((rows,), -1, dtype=torch.long)
        slots[:b] = batch.out_slots.cpu()
        return cls(idx, lens, slots, num_splits)

    def to(self, device: torch.device) -> DecodePlan:
        return DecodePlan(*(t.to(device, non_blocking=True) for t in self.tensors()), self.num_splits)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.page_idx, self.seq_lens, self.slots

    def copy_(self, other: DecodePlan) -> None:
        """Refill this (static) plan in place from a host plan of the same rows and at most its width."""
        w = other.page_idx.shape[1]
        if w > self.page_idx.shape[1] or other.page_idx.shape[0] != self.page_idx.shape[0]:
            raise ValueError(
                f"plan of shape {tuple(other.page_idx.shape)} exceeds {tuple(self.page_idx.shape)}"
            )
        self.page_idx[:, :w].copy_(other.page_idx, non_blocking=True)
        self.seq_lens.copy_(other.seq_lens, non_blocking=True)
        self.slots.copy_(other.slots, non_blocking=True)


class TritonAttentionBackend(AttentionBackend):
    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(pool, num_heads, num_kv_heads, head_dim)
        if pool.device.type != "cuda" and not interpreting():
            raise ValueError(
                "the triton attention backend runs on CUDA tensors (on CPU only in Triton's interpreter: "
                "sgl_kernel_ext.triton_ops.interpret_on_cpu before triton is imported)"
            )
        from sgl_kernel_ext import triton_decode

        self.kernels = triton_decode
        self.prefill = TorchAttentionBackend(pool, num_heads, num_kv_heads, head_dim)
        self.decode: DecodePlan | None = None

    def num_splits(self, batch_size: int, max_seq_len: int) -> int:
        return self.kernels.choose_num_splits(batch_size, self.num_kv_heads, max_seq_len)

    def plan(self, batch: AttentionBatch) -> None:
        self.decode = None
        if not batch.is_decode:
            self.prefill.plan(batch)
            return
        splits = self.num_splits(len(batch.seq_lens), max(batch.seq_lens))
        self.decode = DecodePlan.build(batch, self.pool.page_size, splits).to(self.pool.device)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.decode is None:
            return self.prefill.forward(layer, q, k, v)
        return self.forward_decode(layer, q, k, v, self.decode)

    def forward_decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DecodePlan
    ) -> torch.Tensor:
        """One token per row of ``plan`` (padding rows included): append its K/V, attend."""
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        self.kernels.append_paged_kv(kp, vp, plan.slots, k, v)
        out = self.kernels.paged_decode_attention(
            q, kp, vp, plan.page_idx, plan.seq_lens, self.scale, plan.num_splits
        )
        return out.to(q.dtype)
