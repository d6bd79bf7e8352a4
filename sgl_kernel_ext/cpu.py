"""CPU kernels in C++ (``csrc/``), built once on first use with ``torch.utils.cpp_extension`` (cached
under ``~/.cache/torch_extensions``). Where no compiler is available the ops fall back to the torch
references, so a build failure costs speed, never correctness.

Compiled for AVX2 + FMA only (not ``-march=native``): the build cache may be shared by machines of
different CPU generations.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = ("paged_decode.cpp", "elementwise.cpp")
FUNCTIONS = ["paged_decode_attention", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "apply_rope"]


@functools.cache
def kernels():
    """The compiled module, or None (with a warning) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        csrc = Path(__file__).parent / "csrc"
        return load_inline(
            name="adrenaline_cpu_kernels",
            cpp_sources=[(csrc / name).read_text() for name in SOURCES],
            functions=FUNCTIONS,
            extra_cflags=["-O3", "-ffast-math", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler or headers: the torch references serve instead
        logger.warning("CPU kernels unavailable (%s); using the torch references", e)
        return None
