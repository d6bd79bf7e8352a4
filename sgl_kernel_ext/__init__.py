"""Adrenaline's kernels. Each op has a torch reference (``reference``) that runs everywhere and is
the oracle for the fused CUDA/Triton versions; ``ops`` picks the fused one on a GPU."""

from sgl_kernel_ext.ops import (
    apply_rope,
    fused_add_rms_norm,
    linear,
    rms_norm,
    rope_cos_sin_cache,
    silu_and_mul,
)

__all__ = ["apply_rope", "fused_add_rms_norm", "linear", "rms_norm", "rope_cos_sin_cache", "silu_and_mul"]
