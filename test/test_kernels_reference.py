"""sgl_kernel_ext's ops (the C++ CPU kernels where built, else the torch references) match HF
transformers' Llama modules, the oracle's own code."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from sgl_kernel_ext import apply_rope, fused_add_rms_norm, rms_norm, rope_cos_sin_cache, silu_and_mul


def test_rms_norm_and_fused_add():
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    ref = LlamaRMSNorm(32, eps=1e-6)
    ref.weight.data.normal_()
    assert torch.allclose(rms_norm(x, ref.weight.data, 1e-6), ref(x), atol=1e-6)
    want_res, want_normed = x + r, ref(x + r)
    normed, res = fused_add_rms_norm(x.clone(), r.clone(), ref.weight.data, 1e-6)  # may work in place
    assert torch.allclose(res, want_res) and torch.allclose(normed, want_normed, atol=1e-6)


def test_rope_matches_hf():
    d, t = 16, 9
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cache = rope_cos_sin_cache(inv_freq, 64)
    pos = torch.tensor([0, 3, 5, 8, 13, 21, 34, 55, 63])
    q, k = torch.randn(t, 4, d), torch.randn(t, 2, d)
    emb = torch.cat([torch.outer(pos.float(), inv_freq)] * 2, dim=-1)
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    got_q, got_k = apply_rope(q, k, pos, cache)
    assert torch.allclose(got_q, want_q[0].transpose(0, 1), atol=1e-5)
    assert torch.allclose(got_k, want_k[0].transpose(0, 1), atol=1e-5)


def test_silu_and_mul():
    x = torch.randn(5, 12)
    assert torch.allclose(silu_and_mul(x), torch.nn.functional.silu(x[:, :6]) * x[:, 6:])


def test_chunked_linear_equals_float32_gemm_of_the_same_weights():
    from sgl_kernel_ext.reference import chunked_linear

    x, w, b = torch.randn(5, 32), torch.randn(70, 32).bfloat16(), torch.randn(70).bfloat16()
    got = chunked_linear(x.bfloat16(), w, b, chunk=16)
    want = torch.nn.functional.linear(x.bfloat16().float(), w.float(), b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (5, 70)
    assert torch.allclose(got.float(), want, atol=1e-2, rtol=1e-2)
