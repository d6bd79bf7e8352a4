"""Torch and FlashInfer backends agree on mixed prefill/decode batches (FlashInfer needs a GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adrenaline.attention import create_backend
from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.torch_backend import request_slots
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig

H, HKV, D, PS = 8, 2, 64, 16


def tiny_cfg() -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", 128, 64, 128, 2, H, HKV, D, 1e-5, 1e4, 4096, True, False)


def make_batch(seq_lens: list[int], extend_lens: list[int], device: str) -> tuple[AttentionBatch, int]:
    table, next_page, slots = [], 0, []
    for s, e in zip(seq_lens, extend_lens):
        n = -(-s // PS)
        pages = list(range(next_page, next_page + n))[::-1]  # non-contiguous order on purpose
        next_page += n
        table.append(pages)
        slots.append(request_slots(pages, s, PS, torch.device(device))[s - e :])
    return AttentionBatch(extend_lens, seq_lens, table, torch.cat(slots)), next_page


def reference_attention(q, kf, vf, batch: AttentionBatch) -> torch.Tensor:
    """Dense per-request softmax attention, straight from the definition."""
    out, t = [], 0
    for pages, s, e in zip(batch.page_table, batch.seq_lens, batch.extend_lens):
        slots = request_slots(pages, s, PS, q.device)
        k = kf[slots].repeat_interleave(H // HKV, 1).float()
        v = vf[slots].repeat_interleave(H // HKV, 1).float()
        qs = q[t : t + e].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) / D**0.5
        pos_q = torch.arange(s - e, s, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(s, device=q.device)[None] > pos_q, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        t += e
    return torch.cat(out)


def run_backend(name: str, device: str, dtype: torch.dtype, seq_lens, extend_lens, seed=0):
    batch, pages = make_batch(seq_lens, extend_lens, device)
    pool = KVPool(tiny_cfg(), pages + 1, PS, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for layer in range(2):  # prefix KV already in the pool
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=g).to(dtype))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=g).to(dtype))
    t = batch.num_tokens
    q = torch.randn(t, H, D, generator=g).to(device, dtype)
    k = torch.randn(t, HKV, D, generator=g).to(device, dtype)
    v = torch.randn(t, HKV, D, generator=g).to(device, dtype)
    backend = create_backend(name, pool, H, HKV, D)
    backend.plan(batch)
    out = backend.forward(1, q, k, v)
    kf, vf = pool.flat(1)
    return out, reference_attention(q, kf, vf, batch)


CASES = [([37, 5, 100, 64], [37, 1, 1, 20]), ([1, 17, 33], [1, 1, 1]), ([90], [90])]


@pytest.mark.parametrize("seq_lens,extend_lens", CASES)
def test_torch_backend_matches_definition(seq_lens, extend_lens):
    out, ref = run_backend("torch", "cpu", torch.float32, seq_lens, extend_lens)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="FlashInfer is not installed")
@pytest.mark.parametrize("seq_lens,extend_lens", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flashinfer_matches_torch(seq_lens, extend_lens, dtype):
    fi, ref = run_backend("flashinfer", "cuda", dtype, seq_lens, extend_lens)
    th, _ = run_backend("torch", "cuda", dtype, seq_lens, extend_lens)
    assert torch.allclose(fi.float(), th.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(fi.float(), ref, atol=2e-2, rtol=2e-2)
