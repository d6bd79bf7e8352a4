"""The per-layer offload exchange as device work that a CUDA graph can hold, on one node.

The decode side and the attention executor share three small buffers on the same GPU (CUDA IPC
when they are two processes): an inbox for the offloaded group's packed q|k|v, an outbox for its
attention output, and two flags. Per layer the decode side copies q|k|v into the inbox and raises
the ``ready`` flag; the executor's graph, already waiting on that flag, attends and raises
``done``; the decode graph waits on ``done`` and reads the outbox. No host thread touches a layer:
the flag waits are Triton kernels spinning on device memory (``sgl_kernel_ext/triton_sync.py``),
so both sides are captured graphs.
Flags only grow (step x layers + layer + 1, raised with an atomic max), so nothing is reset between
steps, and a step of -1 makes every wait pass: how both sides run their warm-up before capture.

The two graphs must run at the same time: two streams of one process, or two processes under MPS
(``scripts/start_mps.sh``). Without MPS, two processes' kernels time-slice and a spinning wait
holds its slice: use ``OffloadClient`` over a transport there instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.triton_backend import DecodePlan, TritonAttentionBackend
from adrenaline.runner.cuda_graph import GraphExchange
from sgl_kernel_ext.triton_sync import signal, wait

READY, DONE = 0, 1


@dataclass
class ExchangeBuffers:
    inbox: torch.Tensor  # [rows, H + 2 Hkv, D] packed q|k|v of the offloaded group
    outbox: torch.Tensor  # [rows, H, D] its attention output
    flags: torch.Tensor  # int64 [2]: READY (decode -> executor), DONE (executor -> decode)

    @classmethod
    def create(cls, rows: int, heads: tuple[int, int, int], dtype: torch.dtype, device) -> ExchangeBuffers:
        h, hkv, d = heads
        return cls(
            torch.zeros(rows, h + 2 * hkv, d, dtype=dtype, device=device),
            torch.zeros(rows, h, d, dtype=dtype, device=device),
            torch.zeros(2, dtype=torch.int64, device=device),
        )

    def export(self) -> bytes:
        """The buffers for another process (CUDA IPC handles); keep this object alive meanwhile."""
        from torch.multiprocessing.reductions import reduce_tensor

        return pickle.dumps([reduce_tensor(t) for t in (self.inbox, self.outbox, self.flags)])

    @classmethod
    def attach(cls, blob: bytes) -> ExchangeBuffers:
        return cls(*(fn(*args) for fn, args in pickle.loads(blob)))


class CudaIpcExchange(GraphExchange):
    """Decode side. ``announce`` tells the executor the step's offloaded group (host, once per step,
    before the replay): rooms and lengths over the control path, or ``IpcAttentionServer.step``."""

    def __init__(
        self, buffers: ExchangeBuffers, num_layers: int, announce: Callable[[AttentionBatch, int], None]
    ) -> None:
        self.buffers, self.num_layers, self.announce = buffers, num_layers, announce
        self.step = torch.zeros(1, dtype=torch.int64, device=buffers.flags.device)
        self.steps = 0

    def idle(self, rows: int) -> None:
        self.step.fill_(-1)

    def begin(self, batch: AttentionBatch, rows: int) -> None:
        self.step.fill_(self.steps)
        self.steps += 1
        self.announce(batch, rows)

    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.buffers.inbox[: q.shape[0]].copy_(torch.cat([q, k, v], dim=1))
        signal(self.buffers.flags, self.step, READY, layer, self.num_layers)

    def wait(self, layer: int) -> torch.Tensor:
        wait(self.buffers.flags, self.step, DONE, layer, self.num_layers)
        return self.buffers.outbox


class IpcAttentionServer:
    """Executor side (CUDA): one captured graph per group size attends every layer as its q|k|v
    lands. ``step`` is called once per decode step with the step's group (padded to ``rows``); it
    refills the static plan and launches the graph on its own stream, where it waits on the flags.
    """

    def __init__(self, backend: TritonAttentionBackend, buffers: ExchangeBuffers, num_layers: int) -> None:
        if not buffers.flags.is_cuda:
            raise ValueError("the IPC attention server runs on a CUDA device")
        self.backend, self.buffers, self.num_layers = backend, buffers, num_layers
        self.heads = (backend.num_heads, backend.num_kv_heads)
        self.step_tensor = torch.zeros(1, dtype=torch.int64, device=buffers.flags.device)
        self.steps = 0
        self.stream = torch.cuda.Stream(buffers.flags.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodePlan]] = {}

    def _layers(self, rows: int, plan: DecodePlan) -> None:
        h, hkv = self.heads
        for layer in range(self.num_layers):
            wait(self.buffers.flags, self.step_tensor, READY, layer, self.num_layers)
            q, k, v = self.buffers.inbox[:rows].split([h, hkv, hkv], dim=1)
            out = self.backend.forward_decode(layer, q, k, v, plan)
            self.buffers.outbox[:rows].copy_(out)
            signal(self.buffers.flags, self.step_tensor, DONE, layer, self.num_layers)

    def _graph(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, DecodePlan]:
        if rows not in self.graphs:
            ps = self.backend.pool.page_size
            empty = AttentionBatch([], [], [], torch.zeros(0, dtype=torch.long))
            plan = DecodePlan.build(empty, ps, self.backend.num_splits(rows, width * ps), rows, width)
            plan = plan.to(self.buffers.flags.device)
            self.step_tensor.fill_(-1)  # warm-up (Triton compiles): waits pass, the empty plan writes no KV
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream):
                self._layers(rows, plan)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._layers(rows, plan)
            self.graphs[rows] = (graph, plan)
        return self.graphs[rows]

    def step(self, batch: AttentionBatch, rows: int, width: int) -> None:
        graph, plan = self._graph(rows, width)
        plan.copy_(DecodePlan.build(batch, self.backend.pool.page_size, 0, rows, width))
        self.step_tensor.fill_(self.steps)
        self.steps += 1
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            graph.replay()
