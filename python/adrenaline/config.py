"""Engine configuration: one dataclass shared by the offline Engine and the scheduler process."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model_path: str | None = None  # None -> the default model (SmolLM2-135M-Instruct)
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False  # ids in, ids out: no text, stop strings or grammars
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | torch | flashinfer | triton
    page_size: int = 16
    max_total_tokens: int | None = None  # KV pool size in tokens; None -> from mem_fraction_static
    mem_fraction_static: float | None = None  # share of device memory for weights + KV
    chunked_prefill_size: int = 2048  # token budget of one forward pass
    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU intra-op threads; None -> torch's default
    cuda_graph: bool = True  # decode steps replay CUDA graphs on GPU (off: --disable-cuda-graph)
    # Batch-invariant CPU kernels: outputs independent of batch, chunking and offloading (slower).
    enable_deterministic_inference: bool = False

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.enable_deterministic_inference and self.attention_backend not in ("auto", "torch"):
            raise ValueError("--enable-deterministic-inference needs the torch attention backend")
        if self.attention_backend == "auto":
            gpu = "flashinfer" if importlib.util.find_spec("flashinfer") else "triton"
            gpu = "torch" if self.enable_deterministic_inference else gpu
            self.attention_backend = gpu if self.device == "cuda" else "torch"
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.85 if self.device == "cuda" else 0.2
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError("chunked_prefill_size must be at least page_size")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError("mem_fraction_static must be in (0, 1]")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError("max_total_tokens must be at least page_size")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
