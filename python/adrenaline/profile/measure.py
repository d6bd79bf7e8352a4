"""In-process timings for the profile: a decode step's dense work, paged decode attention, prefill.

Each runs the project's own code (the model's layers, the attention backend, the KV pool), so the
curves price what the server runs. Attention is timed on a one-layer pool: a layer's cost does
not depend on the others, and a pool for 16k tokens of all layers would not fit a small machine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from adrenaline.attention import create_backend
from adrenaline.attention.base import AttentionBatch
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig, resolve_dtype
from adrenaline.models.loader import load_model

PAGE = 16


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """The fastest of ``reps`` runs: on a shared machine other work only ever adds time, so the
    minimum is the closest to the cost itself (as ``timeit`` advises)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        tic = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - tic)
    return min(times) * 1e3


def decode_batch(batch: int, context: int, device: torch.device) -> AttentionBatch:
    """``batch`` decodes sharing ``context`` KV tokens evenly, each on its own run of pages."""
    each = max(1, context // batch)
    width = -(-each // PAGE)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    slots = torch.tensor([t[(each - 1) // PAGE] * PAGE + (each - 1) % PAGE for t in tables], device=device)
    return AttentionBatch([1] * batch, [each] * batch, tables, slots)


class Rig:
    """The served model and an attention pool large enough for the biggest profiled point."""

    def __init__(self, model_path: str, dtype: str, max_batch: int, max_context: int) -> None:
        self.mc = ModelConfig.from_pretrained(model_path)
        hf = getattr(self.mc.hf_config, "dtype", None) or getattr(self.mc.hf_config, "torch_dtype", None)
        self.dtype = resolve_dtype(dtype, hf)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backend_name = "flashinfer" if self.device.type == "cuda" else "torch"
        self.model = load_model(model_path, self.mc, self.dtype, self.device, show_progress=False)
        one_layer = dataclasses.replace(self.mc, num_layers=1)
        pages = -(-max_context // PAGE) + max_batch + 1
        self.attn_pool = KVPool(one_layer, pages, PAGE, self.dtype, self.device)
        mc = self.mc
        self.attention = create_backend(
            self.backend_name, self.attn_pool, mc.num_heads, mc.num_kv_heads, mc.head_dim
        )

    def _qkv(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mc, kw = self.mc, {"dtype": self.dtype, "device": self.device}
        return (
            torch.randn(rows, mc.num_heads, mc.head_dim, **kw),
            torch.randn(rows, mc.num_kv_heads, mc.head_dim, **kw),
            torch.randn(rows, mc.num_kv_heads, mc.head_dim, **kw),
        )

    def dense_ms(self, batch: int, reps: int, threads: int | None = None) -> float:
        """A whole decode step (all layers, logits) with attention replaced by the identity on q, at
        ``threads`` threads (the decode instance's; default: torch's current setting)."""
        ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        pos = torch.full((batch,), 64, dtype=torch.long, device=self.device)
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            with torch.inference_mode():
                return best_ms(lambda: self.model(ids, pos, lambda layer, q, k, v: q), reps)
        finally:
            torch.set_num_threads(before)

    def attention_ms(self, batch: int, context: int, threads: int, reps: int, layers: int = 4) -> float:
        """One layer of decode attention (plan amortised over ``layers``) at ``threads`` threads."""
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        attn_batch, (q, k, v) = decode_batch(batch, context, self.device), self._qkv(batch)

        def step() -> None:
            self.attention.plan(attn_batch)
            for _ in range(layers):
                self.attention.forward(0, q, k, v)

        try:
            with torch.inference_mode():
                return best_ms(step, reps) / layers
        finally:
            torch.set_num_threads(before)

    def prefill_tokens_per_s(self, tokens: int, reps: int) -> float:
        """One prompt of ``tokens`` through the whole model, its KV written to a pool of its own."""
        pool = KVPool(self.mc, -(-tokens // PAGE), PAGE, self.dtype, self.device)
        mc = self.mc
        backend = create_backend(self.backend_name, pool, mc.num_heads, mc.num_kv_heads, mc.head_dim)
        batch = AttentionBatch(
            [tokens], [tokens], [list(range(pool.num_pages))], torch.arange(tokens, device=self.device)
        )
        ids = torch.randint(0, mc.vocab_size, (tokens,), device=self.device)
        pos = torch.arange(tokens, device=self.device)
        last = torch.tensor([tokens - 1], device=self.device)

        def run() -> None:
            backend.plan(batch)
            self.model(ids, pos, backend.forward, last)

        return tokens / best_ms(run, reps) * 1e3
