"""The Triton kernels (``sgl_kernel_ext.triton_decode``) equal their torch references.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest calls ``interpret_on_cpu``
before anything imports triton), on small shapes; ``-m gpu`` runs bigger bf16/fp16 cases on CUDA.
Every test has ``triton`` in its name: ``pytest -k triton`` selects them.
"""

from __future__ import annotations

import pytest
import torch

from sgl_kernel_ext import reference, triton_decode
from sgl_kernel_ext.triton_ops import interpreting
from sgl_kernel_ext.triton_sync import signal, wait

PS = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and triton was imported before interpret_on_cpu", allow_module_level=True)


def paged_case(seq_lens, h, hkv, d, dtype, device, seed=0):
    """Random pool, queries and a shuffled (non-contiguous) page table covering ``seq_lens``."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, -(-max(seq_lens) // PS))
    num_pages = width * len(seq_lens) + 1
    k = torch.randn(num_pages, PS, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(num_pages, PS, hkv, d, generator=g).to(device, dtype)
    q = torch.randn(len(seq_lens), h, d, generator=g).to(device, dtype)
    idx = torch.randperm(num_pages, generator=g)[: width * len(seq_lens)].view(len(seq_lens), width)
    return q, k, v, idx.to(device), torch.tensor(seq_lens, device=device)


def check_decode(seq_lens, h, hkv, d, dtype, device, num_splits, atol):
    q, k, v, idx, lens = paged_case(seq_lens, h, hkv, d, dtype, device)
    got = triton_decode.paged_decode_attention(q, k, v, idx, lens, d**-0.5, num_splits)
    live = lens > 0
    want = reference.paged_decode_attention(q[live], k, v, idx[live], lens[live], d**-0.5)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.allclose(got[live], want, atol=atol, rtol=atol)
    assert not got[~live].any()  # a padded row (seq_len 0) attends nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_triton_decode_matches_reference(dtype, num_splits):
    check_decode([1, 16, 17, 70, 0], 4, 2, 16, dtype, DEVICE, num_splits, atol=1e-5)


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (4, 4, 24)])
def test_triton_decode_gqa_groups_and_head_dims(h, hkv, d):
    """A group of 3 (the default model's) pads to 4 lanes; a head_dim of 24 pads to 32."""
    check_decode([33, 5], h, hkv, d, torch.float32, DEVICE, 2, atol=1e-5)


def append_case(dtype, new_dtype, device, t=5, hkv=2, d=16):
    g = torch.Generator().manual_seed(1)
    pool = [torch.randn(4, PS, hkv, d, generator=g).to(device, dtype) for _ in range(2)]
    new = [torch.randn(t, hkv, d, generator=g).to(device, new_dtype) for _ in range(2)]
    slots = torch.tensor([3, 17, -1, 63, 20][:t], device=device)
    return pool, new, slots


# (pool, new k/v) dtypes; the interpreter rounds fp32 -> bf16 differently from a GPU, so not that cast
@pytest.mark.parametrize(
    "dtype,new_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_triton_append_kv_matches_reference(dtype, new_dtype):
    """Casts to the pool's dtype and skips the padded (negative) slot."""
    (k, v), (nk, nv), slots = append_case(dtype, new_dtype, DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    triton_decode.append_paged_kv(k, v, slots, nk, nv)
    reference.append_paged_kv(k_ref, v_ref, slots, nk, nv)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k.view(-1, 2, 16)[17], nk[1].to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (32, 8, 128)])
def test_triton_decode_gpu_bf16_fp16(dtype, h, hkv, d):
    lens = [1, 15, 16, 17, 300, 2048, 4000, 0] * 4
    check_decode(lens, h, hkv, d, dtype, "cuda", None, atol=1e-4)  # both fp32 math, other orders
    check_decode(lens, h, hkv, d, dtype, "cuda", 1, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_append_kv_gpu_bf16_fp16(dtype):
    """From fp32 k/v: the kernel's cast rounds as torch's does."""
    (k, v), (nk, nv), slots = append_case(dtype, torch.float32, "cuda")
    k_ref, v_ref = k.clone(), v.clone()
    triton_decode.append_paged_kv(k, v, slots, nk, nv)
    reference.append_paged_kv(k_ref, v_ref, slots, nk, nv)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_triton_exchange_flags_only_grow_and_waits_pass_once_raised():
    """The IPC exchange's flag kernels: a signal raises a flag to step x layers + layer + 1 (never
    lowers it); a wait for a raised (or older) target returns. Step -1 (warm-up) passes anything."""
    flags = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    step = torch.tensor([3], device=DEVICE)
    signal(flags, step, 1, 2, 4)
    assert flags.tolist() == [0, 3 * 4 + 2 + 1]
    signal(flags, step, 1, 0, 4)  # an older target leaves it
    assert flags.tolist() == [0, 15]
    for layer in range(3):
        wait(flags, step, 1, layer, 4)
    step.fill_(-1)
    wait(flags, step, 0, 3, 4)
    signal(flags, step, 0, 3, 4)
    assert flags.tolist() == [0, 15]
