"""CUDA graphs for decode steps: one graph per batch-size bucket for plain decode, and one per
(local bucket, offloaded bucket) cell of a 2-D grid when part of the batch's attention is offloaded.

A decode step launches a few hundred small kernels; replaying them as one graph removes their
launch cost, which at small batch is most of the step. A real batch of ``n`` local and ``m``
offloaded requests runs in the smallest captured cell ``(bl >= n, br >= m)``: local rows go to
``[0, n)``, offloaded rows to ``[bl, bl + m)``, the rest is padding (token 0, KV length 0, slot -1:
no KV write, zero attention) whose logits are dropped.

The offloaded group's attention goes through a ``GraphExchange``: a piece whose per-layer
``submit``/``wait`` are device operations only, so they are captured inside the step's graph (on
GPU: CUDA-IPC copies plus flag waits, ``runner/ipc_exchange.py``); its per-step metadata
(``begin``) runs on the host before the replay. Without capture (``capture=False``, CPU tests) the
same padded static path runs eagerly.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod

import torch

from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.triton_backend import DecodePlan, TritonAttentionBackend

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def buckets_up_to(limit: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> list[int]:
    """The buckets below ``limit`` and one that holds it."""
    out = [b for b in buckets if b < limit]
    return [*out, limit if limit > buckets[-1] else buckets[bisect.bisect_left(buckets, limit)]]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` rows (0 for none), None when ``n`` exceeds them all."""
    if n == 0:
        return 0
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def padded_rows(n_local: int, n_remote: int, local_bucket: int) -> torch.Tensor:
    """Row of each real request in the padded batch: local ones first, offloaded ones from the
    local bucket's end."""
    return torch.cat([torch.arange(n_local), local_bucket + torch.arange(n_remote)])


class GraphExchange(ABC):
    """The offloaded group's attention, capturable: ``submit``/``wait`` only enqueue device work."""

    @abstractmethod
    def begin(self, batch: AttentionBatch, rows: int) -> None:
        """Host side, once per step before the replay: the offloaded group padded to ``rows``."""

    @abstractmethod
    def idle(self, rows: int) -> None:
        """Let ``submit``/``wait`` of ``rows`` rows run without a peer: the warm-up before a capture."""

    @abstractmethod
    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    @abstractmethod
    def wait(self, layer: int) -> torch.Tensor:
        """[rows, H, D] attention output of the offloaded group for ``layer``."""


class DecodeGraph:
    """One decode step over static buffers for ``local`` + ``remote`` padded rows."""

    def __init__(
        self, runner, local: int, remote: int, exchange: GraphExchange | None, max_seq_len: int, pool=None
    ) -> None:
        """``pool``: the CUDA graph memory pool to capture into; None runs eagerly (no capture)."""
        self.runner, self.local, self.remote, self.exchange = runner, local, remote, exchange
        backend: TritonAttentionBackend = runner.backend
        dev, rows = runner.device, local + remote
        self.width = -(-max_seq_len // runner.page_size)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        splits = backend.num_splits(max(local, 1), max_seq_len)
        empty = AttentionBatch([], [], [], torch.zeros(0, dtype=torch.long))
        self.plan = DecodePlan.build(empty, runner.page_size, splits, rows=local, width=self.width).to(dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = None if pool is None else self._capture(pool)

    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.local
        if self.remote:
            self.exchange.submit(layer, q[n:], k[n:], v[n:])
        parts = [self.runner.backend.forward_decode(layer, q[:n], k[:n], v[:n], self.plan)] if n else []
        if self.remote:
            parts.append(self.exchange.wait(layer).to(q.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _forward(self) -> torch.Tensor:
        return self.runner.model(self.input_ids, self.positions, self._attention)

    def _capture(self, pool) -> torch.Tensor:
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        if self.exchange is not None:
            self.exchange.idle(self.remote)
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, allocator settles
                self._forward()
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            logits = self._forward()
        return logits

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, n_local: int):
        """Logits of the real rows (local then offloaded), in batch order."""
        n = len(batch.seq_lens)
        rows = padded_rows(n_local, n - n_local, self.local).to(self.input_ids.device)
        self.input_ids.zero_()
        self.positions.zero_()
        self.input_ids[rows] = input_ids
        self.positions[rows] = positions
        local = batch.select(list(range(n_local)), 0)
        self.plan.copy_(DecodePlan.build(local, self.runner.page_size, 0, rows=self.local, width=self.width))
        if self.remote:
            self.exchange.begin(batch.select(list(range(n_local, n)), n_local), self.remote)
        return self.replay()[rows]

    def replay(self) -> torch.Tensor:
        """The step over the static buffers as they stand (a benchmark repeats the last batch)."""
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class LoopbackExchange(GraphExchange):
    """The offloaded group attended inline by a second backend over the executor's pool: the
    exchange without a peer, for checking the 2-D grid's padding and for CPU runs."""

    def __init__(self, backend: TritonAttentionBackend, max_seq_len: int) -> None:
        self.backend = backend
        self.width = -(-max_seq_len // backend.pool.page_size)
        self.plans: dict[int, DecodePlan] = {}  # rows -> the static plan graphs of that size read

    def _build(self, batch: AttentionBatch, rows: int) -> DecodePlan:
        ps = self.backend.pool.page_size
        return DecodePlan.build(batch, ps, self.backend.num_splits(rows, self.width * ps), rows, self.width)

    def idle(self, rows: int) -> None:
        if rows not in self.plans:
            empty = AttentionBatch([], [], [], torch.zeros(0, dtype=torch.long))
            self.plans[rows] = self._build(empty, rows).to(self.backend.pool.device)
        self.plan = self.plans[rows]

    def begin(self, batch: AttentionBatch, rows: int) -> None:
        self.idle(rows)
        self.plan.copy_(self._build(batch, rows))

    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.out = self.backend.forward_decode(layer, q, k, v, self.plan)

    def wait(self, layer: int) -> torch.Tensor:
        return self.out


class DecodeGraphs:
    """Graphs over the (local, offloaded) bucket grid, captured on first use of each cell."""

    def __init__(
        self,
        runner,
        max_batch: int,
        exchange: GraphExchange | None = None,
        capture: bool = True,
        buckets: tuple[int, ...] = BATCH_BUCKETS,
    ) -> None:
        if not isinstance(runner.backend, TritonAttentionBackend):
            raise ValueError("decode graphs need the triton attention backend (a static decode plan)")
        self.runner, self.exchange = runner, exchange
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.max_seq_len = min(runner.model_config.context_len, runner.max_total_tokens)
        self.buckets = buckets_up_to(max_batch, buckets)
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}

    def cell(self, n_local: int, n_remote: int) -> tuple[int, int] | None:
        bl, br = bucket_for(n_local, self.buckets), bucket_for(n_remote, self.buckets)
        if bl is None or br is None or (n_remote and self.exchange is None):
            return None
        return bl, br

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, n_local: int):
        """Logits of a decode batch, or None when no cell fits it (the caller runs it eagerly)."""
        if not batch.is_decode:
            return None
        cell = self.cell(n_local, len(batch.seq_lens) - n_local)
        if cell is None:
            return None
        graph = self.graphs.get(cell)
        if graph is None:
            graph = DecodeGraph(self.runner, *cell, self.exchange, self.max_seq_len, self.pool)
            self.graphs[cell] = graph
        return graph.run(input_ids, positions, batch, n_local)
