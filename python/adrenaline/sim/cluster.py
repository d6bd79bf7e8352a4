"""A PD cluster (xPyD) behind a router, driven by a workload: wiring and the request life cycle.

Life of a request: it reaches the router, which sends it to one prefill and one decode instance
(round robin, SGLang's router in PD mode sends both at once). The decode side admits it
(allocating pages, or placing it on the prefill instance's executor); once the prompt is
prefilled and admitted, its KV moves (PD transfer; in place when offloaded) and decoding starts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from adrenaline.sim.cost import CostModel
from adrenaline.sim.decode import DecodeInstance
from adrenaline.sim.engine import EventLoop
from adrenaline.sim.instance import Env
from adrenaline.sim.policy import Decider, Never
from adrenaline.sim.prefill import Executor, PrefillInstance
from adrenaline.sim.request import SimReq
from adrenaline.sim.workload import Spec


@dataclass
class Deployment:
    prefill: int = 1
    decode: int = 1
    page_size: int = 16
    chunk_budget: int = 8192  # SGLang's chunked_prefill_size on large GPUs
    max_running: int = 256  # per decode instance, running + KV on its way (the runtime's default)
    decode_kv_tokens: int | None = None  # None: what the GPU's memory holds next to the weights
    prefill_kv_tokens: int | None = None  # None: the same; with offloading, what the executor leaves
    offload: bool = False
    executor_kv_fraction: float = 0.8  # of the prefill GPU's KV memory, given to the executor
    executor_kv_tokens: int | None = None  # None: that fraction
    executor_share: float = 0.3  # SM share of the executor on the prefill GPU
    # mps: the share caps the executor, prefill keeps the SMs it leaves idle; green-context: the
    # share is partitioned off, prefill never has it while offloaded work exists
    sm_partition: str = "mps"
    concurrency: int = 0  # closed loop clients when the workload has no arrival times


@dataclass
class Sample:
    time: float
    decode_batch: list[tuple[int, int]]  # per decode instance: (local, offloaded) running
    decode_kv: list[int]  # tokens
    executor_kv: list[int]
    prefill_kv: list[int]
    prefill_queue: int


class Cluster:
    def __init__(self, cost: CostModel, dep: Deployment, decider: Decider | None = None) -> None:
        self.cost, self.dep, self.loop = cost, dep, EventLoop()
        decider = decider or Never()
        cap = cost.kv_capacity_tokens()
        exec_tokens = (dep.executor_kv_tokens or int(cap * dep.executor_kv_fraction)) if dep.offload else 0
        prefill_tokens = dep.prefill_kv_tokens or cap - exec_tokens
        self.executors = [
            Executor(exec_tokens, dep.page_size, dep.executor_share) if dep.offload else None
            for _ in range(dep.prefill)
        ]
        dec_tokens = dep.decode_kv_tokens or cap
        self.max_seq_len = min(cost.model.max_context, dec_tokens)
        env = Env(self.loop, cost, dep.page_size, dep.chunk_budget, self.max_seq_len)
        self.prefills = [
            PrefillInstance(i, env, prefill_tokens, self._prefilled, ex, dep.sm_partition == "green-context")
            for i, ex in enumerate(self.executors)
        ]
        self.decodes = [
            DecodeInstance(
                i, env, dec_tokens, dep.max_running, decider, self.executors, self._admitted, self._finished
            )
            for i in range(dep.decode)
        ]
        decider.bind(self.prefills)
        self.requests: list[SimReq] = []
        self.rejected: list[Spec] = []  # prompts of max_seq_len tokens or more (the runtime's 400)
        self.samples: list[Sample] = []
        self._rr = 0
        self._closed: deque[Spec] = deque()
        self.finished = 0

    # ---- driving ------------------------------------------------------------------------------
    def run(self, specs: list[Spec], sample_dt: float = 0.5) -> list[SimReq]:
        self.rejected = [s for s in specs if s.input_len >= self.max_seq_len]
        specs = [s for s in specs if s.input_len < self.max_seq_len]
        if specs and specs[0].arrival is None:
            if self.dep.concurrency < 1:
                raise ValueError("a workload without arrival times needs a concurrency (closed loop)")
            self._closed = deque(specs)
            for _ in range(min(self.dep.concurrency, len(specs))):
                self._send(self._closed.popleft())
        else:
            for s in specs:
                self.loop.at(s.arrival, lambda s=s: self._send(s))
        self.loop.at(0.0, lambda: self._sample(sample_dt))
        self.loop.run()
        return self.requests

    def _send(self, spec: Spec) -> None:
        req = SimReq(len(self.requests), spec, self.loop.now, self.max_seq_len)
        self.requests.append(req)
        req.prefill = self._rr % self.dep.prefill
        req.decode = self._rr % self.dep.decode
        self._rr += 1
        self.prefills[req.prefill].add(req)
        self.decodes[req.decode].add(req)

    def _sample(self, dt: float) -> None:
        self.samples.append(
            Sample(
                self.loop.now,
                [d.counts() for d in self.decodes],
                [d.used_tokens for d in self.decodes],
                [e.used_tokens if e else 0 for e in self.executors],
                [p.used_tokens for p in self.prefills],
                sum(len(p.waiting) for p in self.prefills),
            )
        )
        if self.loop.pending:  # other events remain (none left: done, or stuck)
            self.loop.after(dt, lambda: self._sample(dt))

    # ---- life cycle -----------------------------------------------------------------------------
    def _admitted(self, req: SimReq) -> None:
        if req.prefilled is not None:
            self._transfer(req)

    def _prefilled(self, req: SimReq) -> None:
        if req.decode_admitted is not None:
            self._transfer(req)

    def _transfer(self, req: SimReq) -> None:
        """Local: the prompt's KV crosses the link. Offloaded: the prefill wrote it in place in the
        executor's pool; only the first token travels."""
        tokens = 0 if req.offload is not None else req.spec.input_len
        self.loop.after(self.cost.kv_transfer_time(tokens), lambda: self._landed(req))

    def _landed(self, req: SimReq) -> None:
        p = self.prefills[req.prefill]
        p.release(req)
        p.ttft_history.append((self.loop.now - req.arrival) * 1e3)
        self.decodes[req.decode].kv_arrived(req)

    def _finished(self, req: SimReq) -> None:
        self.finished += 1
        if self._closed:
            self._send(self._closed.popleft())
        for d in self.decodes:  # a freed executor room may let another decode instance admit
            if d is not self.decodes[req.decode] and d.pending:
                d.admit()
