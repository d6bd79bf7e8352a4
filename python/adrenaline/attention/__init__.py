"""Attention: the backend interface, its torch, FlashInfer and Triton implementations, the offload split."""

from __future__ import annotations

from adrenaline.attention.base import AttentionBackend, AttentionBatch, RemoteAttention
from adrenaline.attention.split import SplitAttention
from adrenaline.kv_cache.pool import KVPool


def create_backend(
    name: str, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int
) -> AttentionBackend:
    if name == "torch":
        from adrenaline.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(pool, num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        from adrenaline.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(pool, num_heads, num_kv_heads, head_dim)
    if name == "triton":
        from adrenaline.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(pool, num_heads, num_kv_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}; choose torch, flashinfer or triton")


__all__ = ["AttentionBackend", "AttentionBatch", "RemoteAttention", "SplitAttention", "create_backend"]
