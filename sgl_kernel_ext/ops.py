"""Op dispatch: FlashInfer's fused CUDA kernels on GPU tensors, our C++ kernels on CPU tensors
(``cpu``), the torch reference where neither is available."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sgl_kernel_ext import cpu, reference


def _flashinfer():
    try:
        import flashinfer

        return flashinfer
    except Exception:  # not installed or no CUDA runtime
        return None


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, scale: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin (FlashInfer's layout)."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


CHUNK_ROWS = 4096  # weight rows upcast at a time: a chunk stays in cache


@functools.cache
def cpu_has_low_precision_fma() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


PACK_ROWS_HINT = 16  # oneDNN picks the packed layout for this many input rows (a decode batch)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed (blocked) layout of a CPU bf16/fp16 linear weight; None where not applicable.

    Packed once at load, decode-size GEMMs ran 25-35% faster here than ``F.linear`` on the plain
    weight (docs/benchmarks.md), with bit-identical results.
    """
    if weight.device.type != "cpu" or not cpu_has_low_precision_fma():
        return None
    mkldnn = torch.ops.mkldnn
    supported = {
        torch.bfloat16: mkldnn._is_mkldnn_bf16_supported,
        torch.float16: mkldnn._is_mkldnn_fp16_supported,
    }
    if weight.dtype not in supported or not supported[weight.dtype]():
        return None
    return mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)


BATCH_INVARIANT_ROWS = 16  # the one GEMM row count used in batch-invariant mode
_batch_invariant = False


def set_batch_invariant(on: bool) -> None:
    """Deterministic inference (``--enable-deterministic-inference``), process-wide: every CPU GEMM
    row and every attention row is computed the same way whatever else shares its batch, so a
    request's tokens do not depend on batch composition, chunking or where its attention ran."""
    global _batch_invariant
    _batch_invariant = on


def batch_invariant() -> bool:
    return _batch_invariant


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, over a packed weight (``pack_linear_weight``) where given one; on CPUs without
    bf16/fp16 FMA, low-precision weights go through float32 GEMMs. In batch-invariant mode on CPU,
    rows go through GEMMs of exactly ``BATCH_INVARIANT_ROWS`` rows (zero-padded): BLAS libraries
    choose kernels and reduction splits by the row count, which changes a row's rounding."""
    if _batch_invariant and not x.is_cuda and x.numel():
        rows, t = x.reshape(-1, x.shape[-1]), BATCH_INVARIANT_ROWS
        n = rows.shape[0]
        if n % t:
            rows = torch.cat([rows, rows.new_zeros(t - n % t, rows.shape[1])])
        out = torch.cat([_linear(rows[i : i + t], weight, bias) for i in range(0, rows.shape[0], t)])
        return out[:n].reshape(*x.shape[:-1], out.shape[-1])
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if not x.is_cuda and weight.dtype != torch.float32 and not cpu_has_low_precision_fma():
        return reference.chunked_linear(x, weight, bias, CHUNK_ROWS)
    return F.linear(x, weight, bias)


def _cpu_ext(*tensors: torch.Tensor):
    """The C++ CPU kernels where every tensor is a contiguous CPU one, else None."""
    if any(t.is_cuda or not t.is_contiguous() for t in tensors):
        return None
    return cpu.kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda and (fi := _flashinfer()) is not None:
        return fi.norm.rmsnorm(x.contiguous(), weight, eps)
    if x.dim() == 2 and (ext := _cpu_ext(x, weight)) is not None:
        return ext.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and (fi := _flashinfer()) is not None:
        x = x.contiguous()
        fi.norm.fused_add_rmsnorm(x, residual, weight, eps)  # in place: x <- norm(x + r), r <- x + r
        return x, residual
    if x.dim() == 2 and (ext := _cpu_ext(x, residual, weight)) is not None:
        ext.fused_add_rms_norm(x, residual, weight, eps)  # in place, as FlashInfer's
        return x, residual
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda and (fi := _flashinfer()) is not None:
        return fi.activation.silu_and_mul(gate_up)
    if gate_up.dim() == 2 and (ext := _cpu_ext(gate_up)) is not None:
        return ext.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def rope_rows(positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype):
    """The per-forward table ``apply_rope`` takes as ``rows`` (None where a kernel reads the cache)."""
    if (positions.is_cuda and _flashinfer() is not None) or _cpu_ext(positions) is not None:
        return None
    return reference.rope_rows(positions, cos_sin, dtype)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.is_cuda and (fi := _flashinfer()) is not None:
        t, hq, d = q.shape
        hk = k.shape[1]
        q2, k2 = q.reshape(t, hq * d).contiguous(), k.reshape(t, hk * d).contiguous()
        fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q2, k2, d, cos_sin, is_neox=True)
        return q2.view(t, hq, d), k2.view(t, hk, d)
    if rows is None and (ext := _cpu_ext(positions, cos_sin)) is not None:
        return tuple(ext.apply_rope(q, k, positions, cos_sin))
    return reference.apply_rope(q, k, positions, cos_sin, rows)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Float32 [B, H, D] decode attention over paged KV (see ``reference.paged_decode_attention``).

    On CPU the C++ kernel reads the pages in place; the reference gathers and upcasts every
    request's KV per layer, which cost more than the layer's GEMMs at batch 16.
    """
    if not q.is_cuda and (ext := cpu.kernels()) is not None:
        return ext.paged_decode_attention(q.contiguous(), k_pages, v_pages, page_idx, seq_lens, scale)
    return reference.paged_decode_attention(q, k_pages, v_pages, page_idx, seq_lens, scale)
