"""The decode side's offloading, behind the scheduler's ``Placement`` seam.

``OffloadManager`` owns what offloading needs: the policy (asked at admission with the live load
view), where each offloaded request's KV lives (its executor and bootstrap room), the client that
computes a step's offloaded group, and the measured load (local free pages from the scheduler,
each executor's KV usage and request count, step and exchange times). The scheduler only calls the
``Placement`` methods; nothing outside ``offload/`` knows a request is offloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from adrenaline.attention.base import RemoteAttention
from adrenaline.core.request import Req
from adrenaline.offload.client import OffloadClient, StepTimes
from adrenaline.offload.exchange import AttentionExchange
from adrenaline.offload.policy import ExecutorLoad, LoadView, OffloadPolicy
from adrenaline.offload.protocol import LoadReport
from adrenaline.scheduler.placement import LocalLoad, Placement

logger = logging.getLogger(__name__)


@dataclass
class Home:
    req: Req
    room: int  # the bootstrap room naming its KV on the executor
    executor: str | None = None  # known once its prompt KV is there


@dataclass
class OffloadStats:
    offloaded: int = 0  # requests placed on executors
    kept_local: int = 0  # candidates the policy kept here
    refused: int = 0  # placed requests whose executor could not take them (run here instead)
    fallbacks: int = 0  # offloaded requests recomputed here after their executor failed


class OffloadManager(Placement):
    def __init__(self, policy: OffloadPolicy, exchange: AttentionExchange, timeout_s: float) -> None:
        self.policy = policy
        self.client = OffloadClient(exchange, timeout_s)
        self.homes: dict[str, Home] = {}  # rid -> where its KV and attention live
        self.local_only: set[str] = set()  # rids an executor refused
        self.stats = OffloadStats()
        self.last_reason = ""
        self.local = LocalLoad(0, 0, 1)  # as the last admission saw it
        self.observed = 0  # the offloaded step whose measurements the policy last saw

    def view(self, local: LocalLoad) -> LoadView:
        executors: dict[str, ExecutorLoad] = {}
        for h in self.homes.values():
            if h.executor is not None:
                e = executors.setdefault(h.executor, ExecutorLoad())
                e.requests += 1
                e.context += h.req.seq_len
        for address, (used, total) in self.client.exchange.executor_pages.items():
            e = executors.setdefault(address, ExecutorLoad())
            e.used_pages, e.num_pages = used, total
        return LoadView(local, len(self.homes), executors, self.client.step_s, self.client.wait_s)

    # ---- Placement ----------------------------------------------------------------------------
    def place(self, req: Req, load: LocalLoad) -> bool:
        if req.rid in self.local_only:
            return False
        self.local = load
        decision = self.policy.decide(self.view(load), req)
        self.last_reason = decision.reason
        if decision.offload:
            self.homes[req.rid] = Home(req, req.bootstrap.room)
            self.stats.offloaded += 1
        else:
            self.stats.kept_local += 1
        return decision.offload

    def attach(self, req: Req, home: str | None) -> None:
        h = self.homes.get(req.rid)
        if h is None:
            return
        if home is None:
            raise ValueError(f"request {req.rid} was offloaded but no executor holds its KV")
        h.executor = home
        self.policy.attached(req, home)
        req.extra["attention_offloaded"] = True  # reported in its meta_info

    def prefill_load(self, req: Req, report: LoadReport) -> None:
        """What ``req``'s prefill instance said about its load (the PD decode role hands it on)."""
        self.policy.prefill_load(req, report)

    def is_local(self, req: Req) -> bool:
        return req.rid not in self.homes

    def remote(self, reqs: list[Req]) -> RemoteAttention:
        return self.client.prepare([(self.homes[r.rid].executor, self.homes[r.rid].room) for r in reqs])

    def failed(self, reqs: list[Req], error: Exception) -> None:
        logger.warning("attention executor failed (%s): %d requests recomputed locally", error, len(reqs))
        self.stats.fallbacks += len(reqs)
        for h in [self.homes[r.rid] for r in reqs if r.rid in self.homes]:
            self.client.exchange.executor_pages.pop(h.executor, None)  # stale until it answers again

    def keep_local(self, req: Req) -> None:
        self.local_only.add(req.rid)
        self.stats.refused += 1
        self.policy.refused(req)

    def release(self, req: Req) -> None:
        self.local_only.discard(req.rid)
        self.policy.release(req)
        h = self.homes.pop(req.rid, None)
        if h is not None and h.executor is not None:
            self.client.free(h.executor, h.room)

    def tick(self) -> None:
        pages = self.client.exchange.executor_pages
        for address in [a for a in pages if self.client.exchange.gone(a)]:
            del pages[address]  # its process exited: no stale counts in the load view
        self.client.flush()
        if self.client.step != self.observed:
            self.observed = self.client.step
            self.policy.observe(self.view(self.local))

    def completed_steps(self) -> list[StepTimes]:
        """The offloaded steps' breakdowns since the last call (for the metrics' histograms)."""
        recent = list(self.client.recent)
        self.client.recent.clear()
        return recent

    def settable(self) -> dict[str, Callable[[Any], None]]:
        return self.policy.settable()

    def info(self) -> dict[str, Any]:
        view = self.view(LocalLoad(0, 0, 0))
        return {
            "policy": type(self.policy).__name__,
            "last_decision": self.last_reason,
            "decisions": self.policy.counters(),
            "offloaded_requests": view.num_offloaded,
            "offloaded_steps": self.client.step,
            "step_s": view.step_s,
            "exchange_wait_s": view.exchange_wait_s,
            "step_breakdown_s": asdict(self.client.breakdown),
            "exchange": self.client.exchange.info(),
            "executors": {a: asdict(e) for a, e in view.executors.items()},
            **asdict(self.stats),
        }
