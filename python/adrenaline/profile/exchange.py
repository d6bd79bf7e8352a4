"""Exchange overhead per layer vs offloaded rows, through a real attention executor process.

The decode side's ``OffloadClient`` sends packed q|k|v and waits for the output, as in serving;
each request holds a few KV tokens only, so the round trip is the exchange, not attention.
"""

from __future__ import annotations

import dataclasses

import torch

from adrenaline.core.request import Req
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.process import start_executor
from adrenaline.offload.protocol import EXEC_ALLOC, EXEC_REPLY
from adrenaline.profile.measure import PAGE, best_ms, decode_batch
from adrenaline.transport import create_transport

TOKENS = PAGE  # KV tokens per request: one page


class ExchangeRig:
    def __init__(self, mc: ModelConfig, dtype: torch.dtype, max_rows: int, transport: str = "tcp") -> None:
        self.mc = mc
        pool = KVPool(dataclasses.replace(mc, num_layers=1), max_rows + 1, PAGE, dtype, "cpu")
        self.proc, address = start_executor(
            pool, mc.num_heads, mc.num_kv_heads, "torch", (transport, "127.0.0.1", None)
        )
        self.transport = create_transport(transport, "127.0.0.1", None)
        self.client = OffloadClient(self.transport, timeout_s=60)
        self.reqs = [self._alloc(address, i) for i in range(max_rows)]
        self.dtype = dtype

    def _alloc(self, address: str, room: int) -> Req:
        self.transport.send(address, EXEC_ALLOC, {"room": room, "tokens": TOKENS, "ask": room})
        reply = self.transport.recv(lambda m: m.kind == EXEC_REPLY and m.meta.get("ask") == room, 60)
        if "error" in reply.meta:
            raise RuntimeError(f"executor alloc failed: {reply.meta['error']}")
        req = Req(str(room), [0] * TOKENS, None)  # type: ignore[arg-type]
        req.offload, req.extra["bootstrap"] = address, ("", 0, room)
        return req

    def round_trip_ms(self, rows: int, reps: int, layers: int = 8) -> float:
        """Fastest ``submit`` + ``wait`` of one layer for ``rows`` offloaded decodes."""
        mc, kw = self.mc, {"dtype": self.dtype}
        q = torch.randn(rows, mc.num_heads, mc.head_dim, **kw)
        k, v = (torch.randn(rows, mc.num_kv_heads, mc.head_dim, **kw) for _ in range(2))
        self.client.prepare(self.reqs[:rows])
        self.client.begin(decode_batch(rows, rows * TOKENS, torch.device("cpu")))

        def layer() -> None:
            self.client.submit(0, q, k, v)
            self.client.wait(0)

        return best_ms(layer, reps * layers, warmup=2)

    def close(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        self.transport.close()
