"""Offloading on one device, without the PD servers: an ``Engine`` whose chosen requests decode
with their attention on a real attention executor process over a KV pool shared with it.

This is the single-node shape of the design (decode GEMMs here, offloaded KV in the executor's
pool, one q|k|v exchange per layer) cut down to what the GPU check and the front-end-free test
need: the pool crosses to the executor as torch shares tensors with a spawned process (CUDA IPC
on GPU, shared memory on CPU); the prompt of an offloaded request is prefilled here and its KV
copied into pages the executor allocated, as a prefill instance would write it in place. The
engine's scheduler offloads through the same ``OffloadManager`` a decode instance plugs in.
It sits above ``engine`` and ``offload`` (it drives both), so it is a top-level module.
"""

from __future__ import annotations

import itertools

import torch

from adrenaline.core.batch import ForwardBatch, ScheduledReq
from adrenaline.core.request import Bootstrap, Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.engine import Engine
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.exchange import TransportExchange
from adrenaline.offload.manager import OffloadManager
from adrenaline.offload.policy import Decision, LoadView, OffloadPolicy
from adrenaline.offload.process import start_executor
from adrenaline.offload.protocol import OFFLOAD, OFFLOAD_VERSION, ExecAlloc, ExecAllocReply
from adrenaline.scheduler.placement import LocalLoad
from adrenaline.transport import create_transport
from adrenaline.transport.kv_pages import gather_pages, scatter_pages


class _Chosen(OffloadPolicy):
    """Offload exactly the requests the caller named."""

    def __init__(self) -> None:
        self.rids: set[str] = set()

    def decide(self, view: LoadView, req: Req) -> Decision:
        return Decision(req.rid in self.rids, "chosen by the caller")


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
        self.policy = _Chosen()
        self.manager = OffloadManager(self.policy, TransportExchange(self.transport), timeout_s)
        engine.scheduler.placement = self.manager
        self.timeout_s = timeout_s
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, offload: set[int]) -> list[list[int]]:
        """Greedy tokens of each prompt; the prompts at indices ``offload`` decode on the executor."""
        sched = self.engine.scheduler
        params = SamplingParams.from_dict(
            {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        )
        reqs = []
        for i, ids in enumerate(prompts):
            room = next(self._ids)
            req = Req(f"colocated-{room}", list(ids), params, bootstrap=Bootstrap(room=room))
            if i in offload:
                self.policy.rids.add(req.rid)
                self._prefill_remotely(req)
            else:
                sched.add_request(req)
            reqs.append(req)
        while not all(r.finished for r in reqs):
            sched.step()
            self.manager.tick()
        return [list(r.output_ids) for r in reqs]

    def _prefill_remotely(self, req: Req) -> None:
        """Prefill here, move the prompt's KV into executor pages, start decoding it offloaded."""
        sched, runner = self.engine.scheduler, self.engine.runner
        n, ps = len(req.input_ids), runner.page_size
        sched.intake.prepare(req)
        pages = sched.allocator.alloc(-(-n // ps))
        req.pages = pages
        batch = ForwardBatch.build([ScheduledReq(req, 0, n, [], True)], ps, runner.device)
        token = int(runner.forward(batch)[0].argmax())
        if not self.manager.place(req, LocalLoad(0, sched.allocator.num_available, ps)):
            raise RuntimeError(f"{req.rid} was named for offloading but not placed remotely")
        room = req.bootstrap.room
        OFFLOAD.send(self.transport, self.address, ExecAlloc(OFFLOAD_VERSION, room, room, n))
        msg = self.transport.recv(lambda m: m.kind == ExecAllocReply.__name__, self.timeout_s)
        reply = OFFLOAD.parse(msg)
        if reply.error is not None:
            raise RuntimeError(reply.error)
        scatter_pages(self.pool, reply.pages, gather_pages(runner.pool, pages))
        if self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)  # the executor reads these pages from its own stream
        sched.allocator.free(pages)
        req.pages = []
        sched.arriving.append(req)
        sched.admit_prefilled(req, token, None, None, self.address)

    def close(self) -> None:
        self.manager.tick()  # send the frees of the finished requests
        self.proc.kill()
        self.proc.join(10)
        self.transport.close()
