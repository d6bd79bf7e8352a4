"""Owns the weights, the KV pool and the attention backend; runs one ``ForwardBatch``."""

from __future__ import annotations

import logging
import time

import torch

from adrenaline.attention import RemoteAttention, SplitAttention, create_backend
from adrenaline.config import EngineConfig
from adrenaline.core.batch import ForwardBatch
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig, resolve_dtype
from adrenaline.models.loader import load_model
from sgl_kernel_ext.ops import set_batch_invariant

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, show_progress: bool = True) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        set_batch_invariant(config.enable_deterministic_inference)
        self.model_config = ModelConfig.from_pretrained(model_path)
        hf_dtype = getattr(self.model_config.hf_config, "dtype", None) or getattr(
            self.model_config.hf_config, "torch_dtype", None
        )
        self.dtype = resolve_dtype(config.dtype, hf_dtype)
        tic = time.perf_counter()
        self.model = load_model(model_path, self.model_config, self.dtype, self.device, show_progress)
        self.page_size = config.page_size
        num_pages = self._num_pages()
        toc = time.perf_counter()
        self.pool = KVPool(self.model_config, num_pages, self.page_size, self.dtype, self.device)
        self.startup_s = {"load_weight": toc - tic, "kv_cache_allocation": time.perf_counter() - toc}
        mc = self.model_config
        self.backend = create_backend(
            config.attention_backend, self.pool, mc.num_heads, mc.num_kv_heads, mc.head_dim
        )
        logger.info(
            "KV pool: %d pages x %d tokens (%.1f MiB)", num_pages, self.page_size, self.pool.nbytes() / 2**20
        )
        self.graphs = None  # decode steps as CUDA graphs (runner/cuda_graph.py), captured on first use
        if config.cuda_graph and self.device.type == "cuda" and config.attention_backend == "triton":
            from adrenaline.runner.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self, config.max_running_requests)

    def _num_pages(self) -> int:
        """Pages from ``max_total_tokens``, else from ``mem_fraction_static`` of the device's memory."""
        if self.config.max_total_tokens is not None:
            tokens = self.config.max_total_tokens
        else:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                budget = total * self.config.mem_fraction_static - (total - free)
            else:
                import psutil  # the front end's dependency: only a CPU engine without a size needs it

                budget = psutil.virtual_memory().available * self.config.mem_fraction_static
            tokens = int(budget // self.model_config.kv_bytes_per_token(self.dtype))
            tokens = min(tokens, self.config.max_running_requests * self.model_config.context_len)
        if tokens < self.page_size:
            raise ValueError(f"KV budget of {tokens} tokens is below one page; raise the memory budget")
        return tokens // self.page_size

    @property
    def max_total_tokens(self) -> int:
        return self.pool.num_slots

    def forward(self, batch: ForwardBatch, remote: RemoteAttention | None = None) -> torch.Tensor:
        """Float32 logits for ``batch.logits_rows``."""
        if remote is None and self.graphs is not None:
            logits = self.graphs.run(batch.input_ids, batch.positions, batch.attn, len(batch.items))
            if logits is not None:
                return logits[batch.logits_rows]
        attention = SplitAttention(self.backend, batch.attn, batch.num_local, remote)
        return self.model(batch.input_ids, batch.positions, attention, batch.logits_rows)
