"""sgl_kernel_ext's CPU kernels match their torch references; packed GEMM weights change nothing."""

from __future__ import annotations

import pytest
import torch

from sgl_kernel_ext import reference
from sgl_kernel_ext.cpu import kernels
from sgl_kernel_ext.ops import linear, pack_linear_weight


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
