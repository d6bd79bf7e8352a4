"""Which new decode requests are offloaded: decided once, at admission, from the load view.

A policy gets the live ``LoadView`` and the candidate request and answers offload-or-not with a
reason (reported in ``/server_info``). A load-aware policy is another ``OffloadPolicy`` here; it
needs nothing outside ``offload/``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adrenaline.core.request import Req
from adrenaline.offload.protocol import LoadReport
from adrenaline.scheduler.placement import LocalLoad


@dataclass
class ExecutorLoad:
    used_pages: int = 0  # as the executor last reported (0 until it answered a layer)
    num_pages: int = 0
    requests: int = 0  # this instance's requests placed there (decoding or on their way)
    context: int = 0  # their KV tokens now


@dataclass
class LoadView:
    local: LocalLoad  # this instance: admitted requests, free pages
    num_offloaded: int  # admitted requests placed on executors
    executors: dict[str, ExecutorLoad] = field(default_factory=dict)
    step_s: float = 0.0  # measured: an offloaded step, begin to the last layer's output
    exchange_wait_s: float = 0.0  # measured: per step, time blocked on executors' outputs

    @property
    def num_local(self) -> int:
        return self.local.requests - self.num_offloaded


@dataclass
class Decision:
    offload: bool
    reason: str


class OffloadPolicy(ABC):
    @abstractmethod
    def decide(self, view: LoadView, req: Req) -> Decision:
        """Whether ``req``, being admitted, runs its attention on an executor, and why. An offload
        may commit executor room until ``release``."""

    # What a policy tracking commitments or live measurements hears; nothing by default.
    def attached(self, req: Req, executor: str) -> None:
        """An offloaded request's prompt KV is on ``executor``."""
        return None

    def release(self, req: Req) -> None:
        """``req`` no longer holds what ``decide`` committed: finished, aborted, retracted or refused."""
        return None

    def refused(self, req: Req) -> None:
        """The executor side could not take ``req`` after all: it runs here."""
        self.release(req)

    def prefill_load(self, req: Req, report: LoadReport) -> None:
        """``req``'s prefill instance reported its load and its executor's (with the prompt's KV)."""
        return None

    def observe(self, view: LoadView) -> None:
        """After each offloaded step, with the live view and its new measurements."""
        return None

    def counters(self) -> dict[str, int]:
        """Decisions so far by reason, for ``/server_info`` and Prometheus."""
        return {}

    def settable(self) -> dict[str, Callable[[Any], None]]:
        """Settings changeable live (``Placement.settable``)."""
        return {}


class StaticRatioPolicy(OffloadPolicy):
    """Keep offloaded:local near ``ratio`` (N/M; ``inf``: offload all), at most ``max_offloaded``."""

    def __init__(self, ratio: float, max_offloaded: int | None = None) -> None:
        self.set_ratio(ratio)
        self.max_offloaded = max_offloaded if max_offloaded is not None else math.inf

    def set_ratio(self, ratio: Any) -> None:
        """A number or its text ("inf"); applies to the next admissions (a sweep changes it live)."""
        ratio = float(ratio)
        if not ratio >= 0:  # NaN too
            raise ValueError("--attention-offload-ratio must be >= 0")
        self.ratio = ratio

    def settable(self) -> dict[str, Callable[[Any], None]]:
        return {"attention_offload_ratio": self.set_ratio}

    def decide(self, view: LoadView, req: Req) -> Decision:
        n, m = view.num_offloaded, view.num_local
        if self.ratio == 0:
            return Decision(False, "offload ratio 0")
        if n >= self.max_offloaded:
            return Decision(False, f"{n} offloaded: at the cap of {self.max_offloaded}")
        if math.isinf(self.ratio):
            return Decision(True, "offload ratio inf")
        # offloading this one keeps N/M closest to the target without overshooting it
        if n + 1 <= self.ratio * max(m, 1):
            return Decision(True, f"{n + 1}:{m} within ratio {self.ratio:g}")
        return Decision(False, f"{n + 1}:{m} would exceed ratio {self.ratio:g}")
