"""What a PD role plugs into the scheduler, declared once (the defaults serve a single instance).

A PD manager never touches the scheduler's lists or allocator: it hands requests in through
``Scheduler.add_request``, implements these hooks, and answers through the scheduler's declared
calls (``admit_prefilled``, ``requeue_local``, ``abort``, ``hold_pages`` / ``drop_pages``).
"""

from __future__ import annotations

from adrenaline.core.batch import ScheduledReq
from adrenaline.core.request import Req


class SchedulerHooks:
    def prefilled_elsewhere(self, req: Req) -> bool:
        """Whether another instance computes this waiting request's prompt KV (PD decode)."""
        return False

    def on_admitted(self, req: Req) -> None:
        """A request prefilled elsewhere was admitted: ``req.pages`` are reserved for its prompt
        (none when placed remotely); ask for its KV, then ``Scheduler.admit_prefilled`` it."""

    def on_forward(self, items: list[ScheduledReq]) -> None:
        """After each forward: each item's KV for [start, end) is in the pool (PD prefill)."""
