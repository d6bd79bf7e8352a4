"""Running the Triton kernels on CPU tensors (tests, ``gpu_check --device cpu``) through Triton's
interpreter.

Triton fixes, when each ``@triton.jit`` function (its own library's included) is defined, whether
it is interpreted (``TRITON_INTERPRET=1``), and compiled and interpreted functions cannot call
each other: the whole of ``triton`` must be imported under the variable. ``interpret_on_cpu``
does that, then restores the environment, so child processes (servers a test starts) do not
inherit it. Call it before anything imports triton (transformers' model modules do).
"""

from __future__ import annotations

import os
import sys

import torch


def interpreting() -> bool:
    """Whether this process's Triton kernels run in the interpreter (they then take CPU tensors)."""
    from sgl_kernel_ext import triton_decode

    return triton_decode.INTERPRETED


def interpret_on_cpu() -> bool:
    """Without a CUDA GPU, import triton and our kernels in interpreter mode; returns whether the
    kernels are interpreted. A no-op with a GPU, or when triton was imported already."""
    if torch.cuda.is_available() or "triton" in sys.modules:
        return interpreting()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401

        try:  # triton >= 3.4 imports gluon lazily at the first launch; it asserts the mode
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
        import sgl_kernel_ext.triton_decode  # noqa: F401
        import sgl_kernel_ext.triton_sync  # noqa: F401
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return True
