"""Triton paged decode attention (GQA, split-K) and append-to-paged-KV: the GPU kernels used where
FlashInfer is absent, and by the attention executor.

KV layout is the pool's (``kv_cache/pool.py``): per layer ``[num_pages, page_size, kv_heads,
head_dim]`` (FlashInfer's NHD). Inputs may be fp32, fp16 or bf16 (q in the KV's dtype); scores,
softmax and the accumulator are fp32.

Decode attention runs in two launches. Stage 1 has one program per (request, KV head, split):
it attends the head's whole GQA group of query heads over one contiguous chunk of the request's
context, so every K/V byte is read once, and writes a partial output with its log-sum-exp; the
group's rows (padded to 16) make QK^T and PV tensor-core matmuls, with the probabilities rounded
to the KV dtype for PV as FlashInfer does (exact fp32 math for fp32 KV). Stage 2
merges the splits. Splitting the context keeps the GPU busy at small batch and long context,
where batch x KV heads alone is fewer programs than SMs. ``num_splits`` is a launch constant, so a
CUDA graph captured with it serves any context length.

Both kernels treat a padded row (``seq_len == 0``, ``slot < 0``) as empty, which is what a CUDA
graph captured for a larger batch bucket needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # context tokens per inner iteration (a multiple of the page size is not required)
TARGET_PROGRAMS = 1024  # stage-1 programs to aim for when choosing the number of splits


@triton.jit
def _decode_stage1(
    Q, K, V, PageIdx, SeqLens, OPart, LsePart, scale,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_pb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    # The group's query heads are the rows of a matrix (padded to a tensor-core tile): QK^T and PV
    # are two small matmuls per block of context.
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        nmask = n < end
        page = tl.load(PageIdx + b * stride_pb + n // PAGE_SIZE, mask=nmask, other=0).to(tl.int64)
        off = page * stride_kp + (n % PAGE_SIZE) * stride_ks + kh * stride_kh
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
        v = tl.load(V + off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, BLOCK], fp32
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
    o_ptr = OPart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr, out, mask=gmask[:, None] & dmask[None, :])
    tl.store(LsePart + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _decode_stage2(
    OPart, LsePart, Out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_b, stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    lse = tl.load(LsePart + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    total = tl.sum(w, axis=0)
    o_ptr = OPart + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :]
    part = tl.load(o_ptr, mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_b + h * stride_h + d, out, mask=d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Splits per request: enough programs to fill the GPU, no split shorter than one block."""
    want = triton.cdiv(TARGET_PROGRAMS, max(batch * num_kv_heads, 1))
    return int(max(1, min(want, triton.cdiv(max(max_seq_len, 1), BLOCK_N), 64)))


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Float32 [B, H, D] decode attention; same contract as ``reference.paged_decode_attention``.

    q: [B, H, D]; k/v_pages: [num_pages, page_size, Hkv, D]; page_idx: [B, W] int pages of each
    request (padded); seq_lens: [B] int (0 for a padded row: its output is zeros). ``num_splits``
    None picks one from the lengths (a host sync); pass it to stay capturable by a CUDA graph.
    ``out``: an fp32 [B, H, D] buffer to write into. ``num_warps`` None: 8 for head_dim >= 64, where
    the per-element K/V addresses of 4 warps take 128+ registers (ptxas, sm_90), else 4.
    """
    b, h, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    if k_pages.stride(-1) != 1 or q.stride(-1) != 1 or k_pages.stride() != v_pages.stride():
        raise ValueError("paged_decode_attention needs unit-stride head_dim and K/V of one layout")
    if num_splits is None:
        num_splits = choose_num_splits(b, hkv, int(seq_lens.max()) if b else 1)
    # The matmuls take one dtype: the KV's, or fp32 in Triton's interpreter, whose bf16 tl.dot is
    # wrong (numpy has no bf16), so CPU tests check the bf16 path's indexing, GPU tests its numerics.
    q = q.to(torch.float32 if INTERPRETED and k_pages.dtype == torch.bfloat16 else k_pages.dtype)
    group = h // hkv
    o_part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device) if out is None else out
    if b == 0:
        return out
    block_d = triton.next_power_of_2(d)
    _decode_stage1[(b, hkv, num_splits)](
        q, k_pages, v_pages, page_idx, seq_lens, o_part, lse_part, scale,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), page_idx.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=block_d,
        PAGE_SIZE=page_size, BLOCK=BLOCK_N, NUM_SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if d * BLOCK_N >= 2048 else 4),
    )  # fmt: skip
    _decode_stage2[(b, h)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
    )  # fmt: skip
    return out


@triton.jit
def _append_kv(
    K, V, Slots, KPool, VPool, stride_kt, stride_kh, stride_vt, stride_vh, stride_ps, stride_ph,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=dmask)
        v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=dmask)
        dst = slot * stride_ps + h * stride_ph + d
        tl.store(KPool + dst, k.to(KPool.dtype.element_ty), mask=dmask)
        tl.store(VPool + dst, v.to(VPool.dtype.element_ty), mask=dmask)


def append_paged_kv(
    k_pages: torch.Tensor, v_pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k/v [T, Hkv, D] of new tokens at flat slots (page * page_size + offset) of the pages,
    cast to the pool's dtype; a negative slot (a padded row) is skipped."""
    t, hkv, d = k.shape
    if t == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not k_pages.is_contiguous() or not v_pages.is_contiguous():
        raise ValueError("append_paged_kv needs unit-stride head_dim and contiguous pages")
    _append_kv[(t, hkv)](
        k, v, slots, k_pages, v_pages, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pages.stride(1), k_pages.stride(2), HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip


INTERPRETED = type(_decode_stage1).__name__ == "InterpretedFunction"
