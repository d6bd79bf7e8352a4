"""Exchange overhead per layer vs offloaded rows, through a real attention executor process.

The decode side's ``OffloadClient`` sends packed q|k|v and waits for the output, as in serving,
over the exchange a decode instance uses for an executor on its host (shared memory, where the
platform has it; else ZeroMQ). The executor reports its own attention time with each output, and
the curve is the round trip less that: the policy prices attention from its own curves.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.exchange import TransportExchange
from adrenaline.offload.process import start_executor
from adrenaline.offload.protocol import OFFLOAD, OFFLOAD_VERSION, ExecAlloc, ExecAllocReply
from adrenaline.offload.shm import ShmExchange
from adrenaline.profile.measure import PAGE, decode_batch
from adrenaline.transport import create_transport
from adrenaline.transport.doorbell import supported
from adrenaline.transport.shm_segment import ShmLayout

TOKENS = PAGE  # KV tokens per request: one page


class ExchangeRig:
    def __init__(self, mc: ModelConfig, dtype: torch.dtype, max_rows: int, transport: str = "tcp") -> None:
        self.mc = mc
        pool = KVPool(dataclasses.replace(mc, num_layers=1), max_rows + 1, PAGE, dtype, "cpu")
        self.proc, address = start_executor(
            pool, mc.num_heads, mc.num_kv_heads, "torch", (transport, "127.0.0.1", None)
        )
        self.transport = create_transport(transport, "127.0.0.1", None)
        heads = (mc.num_heads, mc.num_kv_heads, mc.head_dim)
        exchange = (
            ShmExchange(self.transport, ShmLayout(max_rows, *heads, dtype), timeout_s=60, mode="shm")
            if supported()
            else TransportExchange(self.transport)
        )
        self.client = OffloadClient(exchange, timeout_s=60)
        self.targets = [self._alloc(address, room) for room in range(max_rows)]
        self.dtype = dtype

    def _alloc(self, address: str, room: int) -> tuple[str, int]:
        """Pages for one request's KV in the executor's pool: its (executor, room)."""
        OFFLOAD.send(self.transport, address, ExecAlloc(OFFLOAD_VERSION, room, room, TOKENS))
        name = ExecAllocReply.__name__
        msg = self.transport.recv(lambda m: m.kind == name and m.meta.get("ask") == room, 60)
        reply = OFFLOAD.parse(msg)
        if not isinstance(reply, ExecAllocReply) or reply.error is not None:
            raise RuntimeError(f"executor alloc failed: {getattr(reply, 'error', msg.meta)}")
        return address, room

    def round_trip_ms(self, rows: int, reps: int, layers: int = 8) -> float:
        """Median ``submit`` + ``wait`` of one layer for ``rows`` offloaded decodes, less the
        executor's own attention time."""
        mc, kw = self.mc, {"dtype": self.dtype}
        q = torch.randn(rows, mc.num_heads, mc.head_dim, **kw)
        k, v = (torch.randn(rows, mc.num_kv_heads, mc.head_dim, **kw) for _ in range(2))
        self.client.prepare(self.targets[:rows])
        batch = decode_batch(rows, rows * TOKENS, torch.device("cpu"))
        trips: list[float] = []
        for _ in range(2 + reps * layers):
            self.client.begin(batch)  # a step per round trip: within one, a layer goes out once
            tic = time.perf_counter()
            self.client.submit(0, q, k, v)
            self.client.wait(0)
            trips.append(time.perf_counter() - tic - self.client.exchange.executor_s)
        return statistics.median(trips[2:]) * 1e3  # typical, not best: wake-ups are part of the cost

    def close(self) -> None:
        self.client.exchange.close()
        self.proc.kill()
        self.proc.join(10)
        self.transport.close()
