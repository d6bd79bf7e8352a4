"""sgl_kernel_ext's C++ CPU kernels match their torch references."""

from __future__ import annotations

import pytest
import torch

from sgl_kernel_ext import reference
from sgl_kernel_ext.cpu import kernels


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
