"""The attention executor: a weightless process beside a prefill instance that owns the KV of
offloaded requests and computes their decode attention for decode instances.

Its KV pool is shared with the prefill scheduler's process (shared memory on CPU, CUDA IPC on
GPU: torch passes the tensors' handles when it starts this process), so a prefill writes an
offloaded prompt's KV in place and no KV crosses the network. Per decode step it gets, from each
decode instance, the step's rooms and lengths (growing their pages here), then per layer the
packed q|k|v; it appends k and v to the pool and answers with the attention output. It serves any
number of decode instances, one attention backend (plan) per instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adrenaline.attention import create_backend
from adrenaline.attention.base import AttentionBackend, AttentionBatch
from adrenaline.disaggregation.common import num_pages
from adrenaline.kv_cache.allocator import PageAllocator
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.protocol import (
    ATTN_ERROR,
    ATTN_FREE,
    ATTN_OUT,
    ATTN_QKV,
    ATTN_STEP,
    EXEC_ALLOC,
    EXEC_FREE,
    EXEC_REPLY,
    EXEC_STATS,
)
from adrenaline.transport.base import Message, Transport

logger = logging.getLogger(__name__)

# A room no step touched for this long belongs to a decode instance that died or forgot it.
ROOM_IDLE_S = 600.0


@dataclass
class _Step:
    step: int
    backend: AttentionBackend | None  # None: the step could not be planned
    error: str = ""


class AttentionExecutor:
    def __init__(
        self, pool: KVPool, transport: Transport, num_heads: int, num_kv_heads: int, backend: str
    ) -> None:
        self.pool = pool
        self.transport = transport
        self.heads = (num_heads, num_kv_heads, pool.k[0].shape[-1])
        self.backend_name = backend
        self.allocator = PageAllocator(pool.num_pages, pool.page_size, enable_prefix_caching=False)
        self.pages: dict[int, list[int]] = {}  # bootstrap room -> its pages in the pool
        self.touched: dict[int, float] = {}  # bootstrap room -> when a step or alloc last used it
        self.steps: dict[str, _Step] = {}  # decode peer -> its current step
        self.backends: dict[str, AttentionBackend] = {}
        self.layers_served = 0
        create_backend(backend, pool, num_heads, num_kv_heads, self.heads[2])  # build its kernels now

    # ---- requests' pages ------------------------------------------------------------------------
    def _grow(self, room: int, tokens: int) -> list[int]:
        pages = self.pages.setdefault(room, [])
        self.touched[room] = time.monotonic()
        need = num_pages(tokens, self.pool.page_size) - len(pages)
        if need > self.allocator.num_available:
            raise MemoryError(
                f"executor KV pool full ({self.allocator.num_available} pages free, {need} needed)"
            )
        if need > 0:
            pages.extend(self.allocator.alloc(need))
        return pages

    def _free(self, rooms: list[int]) -> None:
        for room in rooms:
            self.touched.pop(room, None)
            pages = self.pages.pop(room, None)
            if pages:
                self.allocator.free(pages)

    def stats(self) -> dict[str, Any]:
        a = self.allocator
        return {
            "requests": len(self.pages),
            "used_pages": a.num_used,
            "num_pages": a.num_pages,
            "kv_usage": a.num_used / a.num_pages,
            "decode_peers": sorted(self.backends),
            "layers_served": self.layers_served,
        }

    # ---- messages -------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        m = msg.meta
        if msg.kind == ATTN_STEP:
            self._free(m.get("frees", []))
            self.steps[msg.peer] = self._plan(msg.peer, m["step"], m["rooms"], m["seq_lens"])
        elif msg.kind == ATTN_QKV:
            self._attend(msg)
        elif msg.kind in (ATTN_FREE, EXEC_FREE):
            self._free(m["rooms"])
        elif msg.kind == EXEC_ALLOC:
            try:
                reply = {"pages": self._grow(m["room"], m["tokens"])}
            except MemoryError as e:
                self._free([m["room"]])
                reply = {"error": str(e)}
            self.transport.send(msg.peer, EXEC_REPLY, {"ask": m["ask"], **reply})
        elif msg.kind == EXEC_STATS:
            self.transport.send(msg.peer, EXEC_REPLY, {"ask": m["ask"], "stats": self.stats()})

    def _plan(self, peer: str, step: int, rooms: list[int], seq_lens: list[int]) -> _Step:
        unknown = [r for r in rooms if r not in self.pages]
        if unknown:
            return _Step(step, None, f"unknown bootstrap rooms {unknown[:3]}: their KV is not here")
        try:
            tables = [self._grow(r, n) for r, n in zip(rooms, seq_lens)]
        except MemoryError as e:
            return _Step(step, None, str(e))
        ps = self.pool.page_size
        slots = [t[(n - 1) // ps] * ps + (n - 1) % ps for t, n in zip(tables, seq_lens)]
        batch = AttentionBatch(
            extend_lens=[1] * len(rooms),
            seq_lens=list(seq_lens),
            page_table=tables,
            out_slots=torch.tensor(slots, dtype=torch.long, device=self.pool.device),
        )
        backend = self.backends.get(peer)
        if backend is None:
            backend = self.backends[peer] = create_backend(self.backend_name, self.pool, *self.heads)
        backend.plan(batch)
        return _Step(step, backend)

    def _attend(self, msg: Message) -> None:
        step, layer = msg.meta["step"], msg.meta["layer"]
        plan = self.steps.get(msg.peer)
        if plan is None or plan.step != step or plan.backend is None:
            error = plan.error if plan is not None and plan.step == step else f"step {step} was not announced"
            self.transport.send(msg.peer, ATTN_ERROR, {"step": step, "layer": layer, "message": error})
            return
        h, hkv, _ = self.heads
        qkv = msg.tensors[0].to(self.pool.device)
        q, k, v = qkv.split([h, hkv, hkv], dim=1)
        out = plan.backend.forward(layer, q, k, v)
        meta = {"step": step, "layer": layer}
        if layer == 0:
            meta["stats"] = {"used_pages": self.allocator.num_used, "num_pages": self.allocator.num_pages}
        self.transport.send(msg.peer, ATTN_OUT, meta, [out])
        self.layers_served += 1

    def serve(self, alive: Callable[[], bool]) -> None:
        """Serve until ``alive()`` (checked every second) turns false."""
        checked = time.monotonic()
        while True:
            msg = self.transport.poll(0.1)
            if msg is not None:
                self.handle(msg)
            if time.monotonic() - checked > 1:
                checked = time.monotonic()
                if not alive():
                    return
                idle = [r for r, t in self.touched.items() if checked - t > ROOM_IDLE_S]
                if idle:
                    logger.warning("freeing %d rooms idle for %.0f s", len(idle), ROOM_IDLE_S)
                    self._free(idle)
