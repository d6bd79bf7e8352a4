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


# Probabilities are rounded to the KV dtype for the PV matmul (as FlashInfer does): ~2^-8 relative.
# (In Triton's interpreter bf16 KV is attended in fp32: its bf16 matmul is broken.)
ATOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1e-5 if triton_decode.INTERPRETED else 2e-2}


def check_decode(seq_lens, h, hkv, d, dtype, device, num_splits, atol=None):
    atol = ATOL[dtype] if atol is None else atol
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
    check_decode([1, 16, 17, 70, 0], 4, 2, 16, dtype, DEVICE, num_splits)


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (4, 4, 24)])
def test_triton_decode_gqa_groups_and_head_dims(h, hkv, d):
    """A group of 3 (the default model's) pads to 4 lanes; a head_dim of 24 pads to 32."""
    check_decode([33, 5], h, hkv, d, torch.float32, DEVICE, 2)


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
    check_decode(lens, h, hkv, d, dtype, "cuda", None)
    check_decode(lens, h, hkv, d, dtype, "cuda", 1)


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


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sgl_kernel_ext import triton_decode as td, triton_sync as ts

def build(fn, sig, const, warps):
    sig = {**sig, **{c: "constexpr" for c in const}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert k.asm["cubin"], fn.__name__

i32 = lambda names: {n: "i32" for n in names.split()}
for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
    sig = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "PageIdx": "*i32", "SeqLens": "*i32",
           "OPart": "*fp32", "LsePart": "*fp32", "scale": "fp32",
           **i32("stride_qb stride_qh stride_kp stride_ks stride_kh stride_pb stride_ob stride_oh stride_os "
                 "stride_lb stride_lh")}
    build(td._decode_stage1, sig, dict(GROUP=3, BLOCK_G=16, HEAD_DIM=64, BLOCK_D=64, PAGE_SIZE=16, BLOCK=32,
                                       NUM_SPLITS=8, PRECISION=prec), 8)
build(td._decode_stage2, {"OPart": "*fp32", "LsePart": "*fp32", "Out": "*fp32",
      **i32("stride_ob stride_oh stride_os stride_lb stride_lh stride_b stride_h")},
      dict(HEAD_DIM=64, BLOCK_D=64, NUM_SPLITS=8, BLOCK_S=8), 4)
build(td._append_kv, {"K": "*bf16", "V": "*bf16", "Slots": "*i64", "KPool": "*bf16", "VPool": "*bf16",
      **i32("stride_kt stride_kh stride_vt stride_vh stride_ps stride_ph")}, dict(HEAD_DIM=64, BLOCK_D=64), 4)
for fn in (ts._signal, ts._wait):
    build(fn, {"Flags": "*i64", "Step": "*i64", **i32("index layer num_layers")}, {}, 1)
print("compiled")
"""


def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """Triton's CUDA backend (ptxas included) builds every kernel for sm_90 on a machine without a
    GPU, so a GPU run does not meet a compile error first. A fresh process: this one interprets."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.stdout.strip() == "compiled", proc.stderr[-3000:]
