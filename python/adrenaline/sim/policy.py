"""Which admitted decode requests offload their attention: the runtime's policies, adapted.

The simulator does not re-implement a policy: it calls the runtime's (``adrenaline.offload``)
with the inputs the runtime would give it, built from the simulated cluster's state. As in the
runtime today, a request's KV can only go to the executor colocated with its prefill instance;
that executor's KV room is then checked as the prefill side does when it asks it for pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from adrenaline.core.profile import Profile
from adrenaline.offload.load_aware import MARGIN, Candidate, ExecutorLoad, LoadAwarePolicy, LoadView, Slo
from adrenaline.offload.policy import LoadView as CountsView
from adrenaline.offload.policy import StaticRatioPolicy
from adrenaline.scheduler.placement import LocalLoad
from adrenaline.sim.request import SimReq

if TYPE_CHECKING:
    from adrenaline.sim.decode import DecodeInstance
    from adrenaline.sim.prefill import Executor, PrefillInstance


class Decider(Protocol):
    def choose(self, dec: DecodeInstance, req: SimReq, fits: bool) -> bool:
        """Whether ``req`` (about to be admitted by ``dec``, which would admit it locally now when
        ``fits``) offloads to its prefill's executor."""

    def released(self, req: SimReq, executor: int) -> None:
        """An offloaded request left ``executor``, or never reached it (the executor refused)."""

    def bind(self, prefills: Sequence[PrefillInstance]) -> None:
        """The cluster's prefill instances (their executors' and queues' state)."""


class Never:
    def choose(self, dec: DecodeInstance, req: SimReq, fits: bool) -> bool:
        return False

    def released(self, req: SimReq, executor: int) -> None:
        pass

    def bind(self, prefills: Sequence[PrefillInstance]) -> None:
        self.prefills = prefills


def counts_view(local: int, offloaded: int) -> CountsView:
    """The runtime's view for its static rule, which reads only the (local, offloaded) counts."""
    return CountsView(LocalLoad(local + offloaded, free_pages=0, page_size=1), offloaded)


class Static(Never):
    """``--attention-offload-ratio`` (N/M) and ``--max-offloaded-requests``."""

    def __init__(self, ratio: float, max_offloaded: int | None = None) -> None:
        self.policy = StaticRatioPolicy(ratio, max_offloaded)

    def choose(self, dec: DecodeInstance, req: SimReq, fits: bool) -> bool:
        return self.policy.decide(counts_view(*dec.counts()), None).offload


class LoadAware(Never):
    """``--attention-offload-policy load-aware``: ``LoadAwarePolicy.decide`` on a ``LoadView`` of
    the simulated state (the executors' reports are exact and current here)."""

    def __init__(self, profile: Profile, slo: Slo, decodes: int, margin: float = MARGIN) -> None:
        self.policy = LoadAwarePolicy(profile, slo, margin)
        self.decodes = decodes
        self.last: tuple[LoadView, Candidate] | None = None  # the inputs of the latest decision

    def view(self, dec: DecodeInstance, req: SimReq, fits: bool) -> tuple[LoadView, Candidate]:
        local = [r for r in dec.running if r.offload is None]
        ours = sum(r.offload is not None for r in dec.running) + sum(
            r.offload is not None for r in dec.inflight.values()
        )
        p = self.prefills[req.prefill]
        ex: Executor = p.executor
        load = ExecutorLoad(
            name=str(req.prefill),
            capacity_tokens=ex.num_pages * ex.page_size,
            committed_tokens=ex.committed,
            seen_ours_tokens=self.policy.ours[str(req.prefill)],
            clients=self.decodes,
            batch=len(ex.reqs),
            context=sum(r.seq_len for r in ex.reqs.values()),
            prefill_queue=list(p.queue_history),
            ttft_ms=list(p.ttft_history),
        )
        view = LoadView(len(local), sum(r.seq_len for r in local), ours, [load], fits)
        return view, Candidate(req.spec.input_len, req.spec.max_new_tokens)

    def choose(self, dec: DecodeInstance, req: SimReq, fits: bool) -> bool:
        self.last = self.view(dec, req, fits)
        return self.policy.decide(*self.last).executor is not None

    def released(self, req: SimReq, executor: int) -> None:
        self.policy.release(str(executor), req.spec.input_len + req.spec.max_new_tokens)


def make_decider(
    kind: str, ratio: float = 0.0, max_offloaded: int | None = None, profile: Profile | None = None,
    slo: Slo | None = None, decodes: int = 1, margin: float = MARGIN,
) -> Decider:  # fmt: skip
    if kind == "none" or (kind == "static" and ratio == 0):
        return Never()
    if kind == "static":
        return Static(ratio, max_offloaded)
    if kind == "load-aware":
        if profile is None:
            raise ValueError("the load-aware policy needs a profile (measured, or from the analytic model)")
        return LoadAware(profile, slo or Slo(), decodes, margin)
    raise ValueError(f"unknown offload policy {kind!r}")
