"""sgl_kernel_ext's CPU kernels match their torch references; packed GEMM weights change nothing."""

from __future__ import annotations

import pytest
import torch

from sgl_kernel_ext import reference
from sgl_kernel_ext.cpu import kernels
from sgl_kernel_ext.ops import linear, pack_linear_weight, rope_cos_sin_cache


@pytest.mark.skipif(kernels() is None, reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("d", [64, 128, 48])  # the two compiled-in head dims and the generic path
def test_paged_decode_attention_matches_reference(dtype, heads, kv_heads, d):
    g = torch.Generator().manual_seed(0)
    ps, lens = 16, torch.tensor([1, 15, 16, 17, 100, 257])
    width = -(-int(lens.max()) // ps)
    num_pages = len(lens) * width + 3
    k = torch.randn(num_pages, ps, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(num_pages, ps, kv_heads, d, generator=g).to(dtype)
    pages = torch.randperm(num_pages, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    got = kernels().paged_decode_attention(q, k, v, pages, lens, d**-0.5)
    want = reference.paged_decode_attention(q, k, v, pages, lens, d**-0.5)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    pack_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16)) is None,
    reason="this CPU has no oneDNN bf16 GEMM to pack weights for",
)
@pytest.mark.parametrize("rows", [1, 16, 37, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_plain(rows, with_bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(960, 576, generator=g).bfloat16()
    b = torch.randn(960, generator=g).bfloat16() if with_bias else None
    x = torch.randn(rows, 576, generator=g).bfloat16()
    packed = pack_linear_weight(w)
    assert packed.is_mkldnn and torch.equal(packed.to_dense(), w)
    assert torch.equal(linear(x, packed, b), torch.nn.functional.linear(x, w, b))


DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.skipif(kernels() is None, reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_norms_and_activation_match_reference(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    x, r = (torch.randn(rows, 576, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(576, generator=g).to(dtype)
    close = lambda a, b: torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    assert close(kernels().rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    want_normed, want_res = reference.fused_add_rms_norm(x, r, w, 1e-5)
    got_normed, got_res = x.clone(), r.clone()
    kernels().fused_add_rms_norm(got_normed, got_res, w, 1e-5)  # in place
    assert torch.equal(got_res, want_res) and close(got_normed, want_normed)
    gate_up = torch.randn(rows, 2 * 1536, generator=g).to(dtype)
    assert close(kernels().silu_and_mul(gate_up), reference.silu_and_mul(gate_up))


@pytest.mark.skipif(kernels() is None, reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rope_on_strided_qkv_views_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    t, hq, hk, d = 37, 9, 3, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cache = rope_cos_sin_cache(inv_freq, 512)
    pos = torch.randint(0, 512, (t,), generator=g)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)  # row-strided views, as in the model
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    got_q, got_k = kernels().apply_rope(q, k, pos, cache)
    want_q, want_k = reference.apply_rope(q, k, pos, cache)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.is_contiguous() and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
