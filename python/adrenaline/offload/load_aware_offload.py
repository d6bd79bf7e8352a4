"""``LoadAwarePolicy`` behind the manager's ``OffloadPolicy`` interface: the adapter between the
manager's live view (local load, executors' KV reports, measured exchange waits) and the pure
policy's ``LoadView`` of ``Candidate``\\s and ``ExecutorLoad``\\s.

A request can only be offloaded to its own prefill instance's executor (the router chose the
prefill instance; its executor is where the prompt's KV is written), so executors are named by
the prefill instance's bootstrap address. Each prompt's ``KVDone`` brings that prefill instance's
``LoadReport`` (its queue and TTFT history, its executor's ledger as we share it), which prices
the executor:

- not yet heard from: one probe at a time;
- reported: its ledger's room, the other decode instances' share, its load and its prefill's;
- no executor there (or it is down), or it refused a probe: left alone (``RETRY_S`` after a refusal).

Measured time per layer, for the live correction: when a step blocked on the executors' outputs,
their attention plus exchange took the local attention's time (profiled) plus that wait.
"""

from __future__ import annotations

import time

from adrenaline.core.profile import Profile
from adrenaline.core.request import Req
from adrenaline.offload import load_aware as la
from adrenaline.offload.policy import Decision, LoadView, OffloadPolicy
from adrenaline.offload.protocol import LoadReport

RETRY_S = 30.0
MEASURED_WAIT = 0.1  # a wait below this share of the local attention says nothing: noise


def prefill_of(req: Req) -> str:
    return f"{req.bootstrap.host}:{req.bootstrap.port}"


class LoadAwareOffload(OffloadPolicy):
    def __init__(self, profile: Profile, slo: la.Slo | None = None, margin: float = la.MARGIN) -> None:
        self.policy = la.LoadAwarePolicy(profile, slo, margin)
        self.executors: dict[str, str] = {}  # prefill instance -> its executor's address
        self.refused_until: dict[str, float] = {}  # prefill instance -> when to probe it again
        self.commits: dict[str, tuple[str, int]] = {}  # rid -> (prefill instance, future tokens)
        self.reports: dict[str, LoadReport] = {}  # prefill instance -> its last load report

    def decide(self, view: LoadView, req: Req) -> Decision:
        name = prefill_of(req)
        cand = la.Candidate(len(req.input_ids), req.params.max_new_tokens)
        ex = self._executor(name, cand)
        local_batch = max(view.num_local, 0)
        executors = [ex] if ex else []
        pview = la.LoadView(local_batch, view.local.context, view.num_offloaded, executors, view.local.fits)
        d = self.policy.decide(pview, cand)
        if d.executor is not None:
            self.commits[req.rid] = (name, cand.future_tokens)
        priced = f" ({d.predicted_ms:.3f} ms/layer predicted)" if d.predicted_ms else ""
        return Decision(d.executor is not None, d.reason.value + priced)

    def _executor(self, name: str, cand: la.Candidate) -> la.ExecutorLoad | None:
        if self.refused_until.get(name, 0.0) > time.monotonic():
            return None
        r = self.reports.get(name)
        if r is None:  # not heard from yet: one probe at a time
            return la.ExecutorLoad(name, capacity_tokens=0 if self.policy.ours[name] else cand.future_tokens)
        if r.capacity_tokens == 0:
            return None
        return la.ExecutorLoad(
            name,
            r.capacity_tokens,
            r.reserve_tokens,
            r.committed_tokens,
            r.seen_ours_tokens,
            r.clients,
            batch=r.requests,
            context=r.context_tokens,
            prefill_queue=r.prefill_queue,
            ttft_ms=r.ttft_ms,
        )

    def prefill_load(self, req: Req, report: LoadReport) -> None:
        self.reports[prefill_of(req)] = report

    def attached(self, req: Req, executor: str) -> None:
        self.executors[prefill_of(req)] = executor

    def release(self, req: Req) -> None:
        name, tokens = self.commits.pop(req.rid, ("", 0))
        if tokens:
            self.policy.release(name, tokens)

    def refused(self, req: Req) -> None:
        """The prefill instance could not offload ``req``; back off it when it was a probe (its refusals
        after a report are priced by the next report)."""
        name = prefill_of(req)
        if name not in self.reports:
            self.refused_until[name] = time.monotonic() + RETRY_S
        self.release(req)

    def observe(self, view: LoadView) -> None:
        profile = self.policy.profile
        window = profile.local_attention_ms(max(view.num_local, 0), view.local.context)
        wait = view.exchange_wait_s * 1e3 / profile.num_layers
        if wait <= MEASURED_WAIT * window:
            return
        loads = [
            la.ExecutorLoad(name, 0, batch=r.requests, context=r.context, measured_ms=window + wait)
            for name, address in self.executors.items()
            if (r := view.executors.get(address)) is not None and r.requests
        ]
        self.policy.observe(la.LoadView(view.num_local, view.local.context, view.num_offloaded, loads))

    def counters(self) -> dict[str, int]:
        return self.policy.counters()
