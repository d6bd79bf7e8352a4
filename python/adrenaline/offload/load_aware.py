"""Load-aware offloading: offload a request only while it cannot run here and offloading it pays.

Pure (stdlib and the profile schema only): the decode scheduler builds a ``LoadView`` from its own
state and the executors' reports, and asks ``LoadAwarePolicy.decide(view, candidate)`` for each
new request, and again for queued ones every step. The answer offloads to one executor or keeps the
request local, with a ``Reason``. A request that the decode instance would admit locally now stays
local (``local_room``): offloading only pays when the decode instance cannot hold it. Otherwise it
is offloaded only while all of these hold, checked per reachable executor, least loaded first:

- memory: the executor pool has room for the request's whole future KV (prompt + max_new_tokens)
  after the prefill's reserve, counting every commitment already made, ours included even before
  the executor reports it (so it is never overcommitted);
- fair share: with several decode instances, ours stays within an equal share of that room;
- prefill protection: the executor's prefill instance is not falling behind (TTFT above the SLO,
  or its queue or TTFT rising);
- executor speed: the executor computes the group's attention no slower than the decode side
  would, else offloading only moves time onto the critical path;
- step budget: the predicted decode step with the request offloaded (the dense work of one more
  row, and the remote attention + exchange where it outlasts the local attention) stays within
  ``1 + margin`` times the step of the same local batch with nothing offloaded. This is what
  offloading adds to TPOT. The paper's C2 (the remote time hides under the local attention) is
  its special case of a free dense row and a hidden exchange; on a CPU, where the exchange alone
  outlasts a small batch's local attention, C2 refuses every offload;
- TPOT SLO: the predicted decode step with the request stays within the SLO.

Predictions come from the profile, corrected per executor by an EWMA of measured/predicted time
(``observe``), so a busier or slower executor than profiled is priced as measured.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from adrenaline.core.profile import Profile

MARGIN = 0.2  # the step budget: TPOT at most 1.2x what the local batch alone would see


class Reason(str, enum.Enum):
    OK = "ok"  # offloaded
    LOCAL_ROOM = "local_room"  # the decode instance admits it itself: offloading would only cost
    MEMORY = "memory"
    FAIR_SHARE = "fair_share"
    PREFILL_PROTECTION = "prefill_protection"
    SLOWER_THAN_LOCAL = "slower_than_local"
    STEP_BUDGET = "step_budget"
    TPOT_SLO = "tpot_slo"
    NO_EXECUTOR = "no_executor"


@dataclass
class ExecutorLoad:
    """One executor as the decode side sees it (its last report plus our own state)."""

    name: str
    # memory, as ``ExecutorLedger.report`` gives it
    capacity_tokens: int  # KV tokens its pool holds
    reserve_tokens: int = 0  # kept for its prefill instance's own work
    committed_tokens: int = 0  # future KV (prompt + max_new) of all offloaded requests it holds
    seen_ours_tokens: int = 0  # the part of committed_tokens it counts as ours
    clients: int = 1  # decode instances sharing it (fair share of the room each)
    batch: int = 0  # offloaded requests it runs per step, all clients, queued included
    context: int = 0  # their total KV length now
    measured_ms: float | None = None  # attention + exchange per layer last measured for `batch`
    prefill_queue: list[int] = field(default_factory=list)  # recent queue lengths, oldest first
    ttft_ms: list[float] = field(default_factory=list)  # recent TTFTs, oldest first
    reachable: bool = True

    @property
    def free_tokens(self) -> int:
        """Room for new commitments as reported (ours made since not counted)."""
        return self.capacity_tokens - self.reserve_tokens - self.committed_tokens


@dataclass
class LoadView:
    """The decode instance's load and the executors it can offload to."""

    local_batch: int
    local_context: int
    offloaded_batch: int  # ours, on all executors (its dense work runs here)
    executors: list[ExecutorLoad]
    local_room: bool = False  # the candidate would be admitted here now, were it kept local


@dataclass
class Candidate:
    prompt_len: int
    max_new_tokens: int

    @property
    def future_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass
class Slo:
    tpot_ms: float | None = None
    ttft_ms: float | None = None


@dataclass
class Decision:
    executor: str | None  # None: keep local
    reason: Reason
    predicted_ms: float = 0.0  # the chosen (or least-loaded refusing) executor's time per layer


def rising(xs: list[float], window: int = 3) -> bool:
    """Strictly increasing over the last ``window`` samples: a queue or TTFT falling behind."""
    tail = xs[-window:]
    return len(tail) == window and all(a < b for a, b in zip(tail, tail[1:]))


class LoadAwarePolicy:
    def __init__(self, profile: Profile, slo: Slo | None = None, margin: float = MARGIN, ewma: float = 0.3):
        self.profile = profile
        self.slo = slo or Slo()
        self.margin = margin
        self.ewma = ewma
        self.correction: dict[str, float] = {}  # executor -> measured / profiled time
        self.ours: Counter[str] = Counter()  # executor -> future KV tokens we committed there
        self.counts: Counter[Reason] = Counter()

    # ---- live state ---------------------------------------------------------------------------
    def observe(self, view: LoadView) -> None:
        """Fold the executors' measured times into the correction (once per step, on new reports)."""
        for ex in view.executors:
            if ex.measured_ms is None or ex.batch <= 0:
                continue
            ratio = ex.measured_ms / max(self._profiled_ms(ex.batch, ex.context), 1e-9)
            old = self.correction.get(ex.name)
            self.correction[ex.name] = ratio if old is None else old + self.ewma * (ratio - old)

    def release(self, executor: str, tokens: int) -> None:
        """An offloaded request finished or was aborted: its future KV is free again."""
        self.ours[executor] = max(0, self.ours[executor] - tokens)

    def counters(self) -> dict[str, int]:
        """Decisions so far by reason, for ``/server_info`` and Prometheus."""
        return {r.value: self.counts[r] for r in Reason}

    # ---- the decision -------------------------------------------------------------------------
    def decide(self, view: LoadView, cand: Candidate) -> Decision:
        """Offload ``cand`` to the least-loaded executor passing every bound, or keep it local.

        An offload commits the request's future KV on that executor until ``release``; call it
        also when the decision is not carried out (the executor refused, the request aborted)."""
        if view.local_room:
            self.counts[Reason.LOCAL_ROOM] += 1
            return Decision(None, Reason.LOCAL_ROOM)
        options = sorted(
            (self._check(view, ex, cand) for ex in view.executors if ex.reachable),
            key=lambda d: (d.reason is not Reason.OK, d.predicted_ms),
        )
        decision = options[0] if options else Decision(None, Reason.NO_EXECUTOR)
        if decision.reason is Reason.OK:
            self.ours[decision.executor] += cand.future_tokens
        else:
            decision.executor = None
        self.counts[decision.reason] += 1
        return decision

    def _check(self, view: LoadView, ex: ExecutorLoad, cand: Candidate) -> Decision:
        batch, context = ex.batch + 1, ex.context + cand.prompt_len
        t = self.predicted_ms(ex, batch, context)
        step = self.profile.step_ms(view.local_batch, view.local_context, view.offloaded_batch + 1, t)
        reason = (
            self._memory(ex, cand)
            or self._prefill(ex)
            or self._speed(ex, batch, context)
            or self._budget(view, step)
            or self._tpot(step)
            or Reason.OK
        )
        return Decision(ex.name, reason, t)

    # ---- the bounds, each None when it holds --------------------------------------------------
    def _memory(self, ex: ExecutorLoad, cand: Candidate) -> Reason | None:
        unseen = max(0, self.ours[ex.name] - ex.seen_ours_tokens)  # ours it has not reported yet
        if unseen + cand.future_tokens > ex.free_tokens:
            return Reason.MEMORY
        share = (ex.capacity_tokens - ex.reserve_tokens) / max(ex.clients, 1)
        if self.ours[ex.name] + cand.future_tokens > share:
            return Reason.FAIR_SHARE
        return None

    def _prefill(self, ex: ExecutorLoad) -> Reason | None:
        slo = self.slo.ttft_ms
        over = slo is not None and bool(ex.ttft_ms) and ex.ttft_ms[-1] > slo
        if over or rising(ex.prefill_queue) or rising(ex.ttft_ms):
            return Reason.PREFILL_PROTECTION
        return None

    def _speed(self, ex: ExecutorLoad, batch: int, context: int) -> Reason | None:
        remote = self.correction.get(ex.name, 1.0) * self.profile.executor_attention_ms(batch, context)
        return Reason.SLOWER_THAN_LOCAL if remote > self.profile.local_attention_ms(batch, context) else None

    def _budget(self, view: LoadView, step_ms: float) -> Reason | None:
        alone = self.profile.step_ms(view.local_batch, view.local_context)
        return Reason.STEP_BUDGET if step_ms > (1 + self.margin) * alone else None

    def _tpot(self, step_ms: float) -> Reason | None:
        slo = self.slo.tpot_ms
        return Reason.TPOT_SLO if slo is not None and step_ms > slo else None

    # ---- predictions --------------------------------------------------------------------------
    def _profiled_ms(self, batch: int, context: int) -> float:
        return self.profile.executor_attention_ms(batch, context) + self.profile.exchange_ms(batch)

    def predicted_ms(self, ex: ExecutorLoad, batch: int, context: int) -> float:
        """Executor attention + exchange per layer for ``batch`` requests (all its clients', whose
        exchanges it serves in turn), corrected as measured."""
        return self.correction.get(ex.name, 1.0) * self._profiled_ms(batch, context)
