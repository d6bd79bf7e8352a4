"""Offloading on one device, without the PD servers: an ``Engine`` whose chosen requests decode
with their attention on a real attention executor process over a KV pool shared with it.

This is the single-node shape of the design (decode GEMMs here, offloaded KV in the executor's
pool, one q|k|v exchange per layer) cut down to what the GPU check and the front-end-free test
need: the pool crosses to the executor as torch shares tensors with a spawned process (CUDA IPC
on GPU, shared memory on CPU); the prompt of an offloaded request is prefilled here and its KV
copied into pages the executor allocated, as a prefill instance would write it in place.
"""

from __future__ import annotations

import itertools

import torch

from adrenaline.disaggregation.common import gather_pages, scatter_pages
from adrenaline.engine import Engine
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.process import start_executor
from adrenaline.offload.protocol import EXEC_ALLOC, EXEC_REPLY
from adrenaline.sampling.params import SamplingParams
from adrenaline.scheduler.batch import ForwardBatch, ScheduledReq
from adrenaline.scheduler.request import Req
from adrenaline.transport import create_transport


class ColocatedOffload:
    def __init__(
        self,
        engine: Engine,
        transport: str = "socket",
        executor_tokens: int = 4096,
        sm_percent: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        r, mc = engine.runner, engine.runner.model_config
        self.engine = engine
        self.pool = KVPool(mc, executor_tokens // r.page_size, r.page_size, r.dtype, r.device)
        backend = engine.config.attention_backend
        self.proc, self.address = start_executor(
            self.pool, mc.num_heads, mc.num_kv_heads, backend, (transport, "127.0.0.1", None), sm_percent
        )
        self.transport = create_transport(transport, "127.0.0.1", None)
        self.client = OffloadClient(self.transport, timeout_s)
        self.timeout_s = timeout_s
        engine.scheduler.remote = self.client
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, offload: set[int]) -> list[list[int]]:
        """Greedy tokens of each prompt; the prompts at indices ``offload`` decode on the executor."""
        sched = self.engine.scheduler
        params = SamplingParams.from_dict(
            {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        )
        reqs = []
        for i, ids in enumerate(prompts):
            req = Req(f"colocated-{next(self._ids)}", list(ids), params)
            if i in offload:
                sched.prepare(req)
                self._prefill_remotely(req)
            else:
                sched.add_request(req)
            reqs.append(req)
        while not all(r.finished for r in reqs):
            sched.step()
        return [list(r.output_ids) for r in reqs]

    def _prefill_remotely(self, req: Req) -> None:
        """Prefill here, move the prompt's KV into executor pages, start decoding it offloaded."""
        sched, runner = self.engine.scheduler, self.engine.runner
        n, ps = len(req.input_ids), runner.page_size
        req.pages = sched.allocator.alloc(-(-n // ps))
        batch = ForwardBatch.build([ScheduledReq(req, 0, n, [], True)], ps, runner.device)
        token = int(runner.forward(batch)[0].argmax())
        room = next(self._ids)
        self.transport.send(self.address, EXEC_ALLOC, {"room": room, "tokens": n, "ask": room})
        reply = self.transport.recv(lambda m: m.kind == EXEC_REPLY and m.meta["ask"] == room, self.timeout_s)
        if "error" in reply.meta:
            raise RuntimeError(reply.meta["error"])
        scatter_pages(self.pool, reply.meta["pages"], gather_pages(runner.pool, req.pages))
        if self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)  # the executor reads these pages from its own stream
        sched.allocator.free(req.pages)
        req.pages, req.offload, req.extra["bootstrap"] = [], self.address, ("colocated", 0, room)
        sched.admit_prefilled(req, token, None, None)

    def close(self) -> None:
        self.client.flush()
        self.proc.kill()
        self.proc.join(10)
        self.transport.close()
