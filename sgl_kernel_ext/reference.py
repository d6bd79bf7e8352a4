"""Torch reference implementations, numerically matching HF transformers' Llama modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then normalise it; returns (normed, new residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int = 4096):
    """``F.linear`` in float32 from low-precision weights, upcasting ``chunk`` rows at a time.

    For CPUs without bf16/fp16 FMA (AVX2), whose native low-precision GEMMs run ~5x slower than
    float32 ones; each chunk is upcast while it is in cache, and float32 accumulation is at least
    as accurate. Returns ``x``'s dtype.
    """
    xf = x.float()
    outs = [F.linear(xf, w.float()) for w in weight.split(chunk)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_rows(positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype):
    """Per-token cos and sign-folded sin, [T, 1, head_dim] in ``dtype``: built once per forward pass.

    ``cos_sin`` is the cache from ``rope_cos_sin_cache``: [max_pos, head_dim] holding cos | sin halves.
    The sin's first half is negated, so ``rotate_half(x) * sin == x.roll(half) * signed_sin`` exactly.
    """
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (Llama's ``rotate_half``) on [T, heads, head_dim] tensors.

    ``rows``: ``rope_rows(positions, cos_sin, q.dtype)`` when the caller has it already.
    """
    cos, sin = rows if rows is not None else rope_rows(positions, cos_sin, q.dtype)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per request against its paged KV, in float32: gathers whole pages, masks the tail.

    q: [B, H, D]; k/v_pages: [num_pages, page_size, Hkv, D]; page_idx: [B, W] pages of each request
    (padded); seq_lens: [B]. Returns float32 [B, H, D].
    """
    b, hkv, d = q.shape[0], k_pages.shape[2], q.shape[2]
    ks = k_pages[page_idx].view(b, -1, hkv, d).transpose(1, 2).float()
    vs = v_pages[page_idx].view(b, -1, hkv, d).transpose(1, 2).float()
    valid = torch.arange(ks.shape[2], device=q.device)[None, :] < seq_lens[:, None]
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None, :], ks, vs, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o[:, :, 0, :]


def append_paged_kv(
    k_pages: torch.Tensor, v_pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k/v [T, Hkv, D] at flat slots (page * page_size + offset); negative slots are skipped."""
    keep = slots >= 0
    for pages, new in ((k_pages, k), (v_pages, v)):
        pages.view(-1, *pages.shape[2:]).index_copy_(0, slots[keep], new[keep].to(pages.dtype))
