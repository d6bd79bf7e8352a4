"""Decode side of attention offloading: the ``RemoteAttention`` of a step's offloaded group.

Once per step, before layer 0, each executor of the group gets the group's rooms and lengths plus
the rooms freed since (``begin``). Per layer, each gets its rows of the packed q|k|v while the
local group's attention runs here (``submit``), and its output comes back (``wait``); outputs are
concatenated in batch order. A missing or failed answer raises ``RemoteAttentionError`` after
``timeout_s``: the scheduler then recomputes those requests locally. The client measures the
step (``begin`` to the last ``wait``) and the time spent waiting: the load view's exchange times;
and each step's breakdown (``StepTimes``) for ``/server_info`` and the metrics.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, fields

import torch

from adrenaline.attention.base import RemoteAttention
from adrenaline.core.batch import AttentionBatch
from adrenaline.offload.exchange import AttentionExchange, Group

EWMA = 0.2  # weight of the newest measurement in the running averages
RECENT_STEPS = 1024  # step breakdowns kept until the metrics read them


@dataclass
class StepTimes:
    """Where an offloaded step's time went, from ``begin`` to the last layer's output (seconds)."""

    dense_s: float = 0.0  # the rest: projections, MLPs, norms between layers
    local_attention_s: float = 0.0  # from each layer's submit to its wait: the local group's attention
    executor_wait_s: float = 0.0  # blocked on outputs: the executor's attention and the answer
    exchange_s: float = 0.0  # announcing the step and shipping q|k|v (packing, sending, doorbells)
    # Not a share of the step (it runs on the executor, alongside): the executors' own attention
    # time, reported with each output (the slowest group's, per layer). executor_wait less what of it
    # local_attention did not hide is the transport's cost.
    executor_attention_s: float = 0.0

    def ewma(self, new: StepTimes) -> None:
        for f in fields(self):
            old = getattr(self, f.name)
            setattr(self, f.name, old + EWMA * (getattr(new, f.name) - old))


class OffloadClient(RemoteAttention):
    def __init__(self, exchange: AttentionExchange, timeout_s: float) -> None:
        self.exchange = exchange
        self.timeout_s = timeout_s
        self.step = 0
        self.groups: list[Group] = []
        self.frees: dict[str, list[int]] = defaultdict(list)
        self.step_s = 0.0  # running average: begin to the last layer's output
        self.wait_s = 0.0  # running average, per step: time blocked on outputs
        self._began = self._ended = self._waited = 0.0
        self._exchanged = self._local = self._submitted = 0.0
        self.breakdown = StepTimes()  # running average
        self.recent: deque[StepTimes] = deque(maxlen=RECENT_STEPS)  # completed steps, oldest first

    def prepare(self, targets: list[tuple[str, int]]) -> RemoteAttention:
        """The next forward's offloaded group: (executor, room) per request in batch order."""
        self.groups = []
        for i, (executor, room) in enumerate(targets):
            if not self.groups or self.groups[-1].executor != executor:
                self.groups.append(Group(executor, i))
            self.groups[-1].rooms.append(room)
        return self

    def free(self, executor: str, room: int) -> None:
        """Release a request's executor KV (sent with the next step, or by ``flush``)."""
        self.frees[executor].append(room)

    def flush(self) -> None:
        for executor, rooms in list(self.frees.items()):
            self.exchange.free(executor, rooms)
        self.frees.clear()

    # ---- RemoteAttention ----------------------------------------------------------------------
    def begin(self, batch: AttentionBatch) -> None:
        if not batch.is_decode:
            raise ValueError("offloaded requests only decode: their prompts were prefilled elsewhere")
        self.end_step()
        self.step += 1
        self._began = time.perf_counter()
        self._waited = self._local = self._executor = 0.0
        for g in self.groups:
            g.seq_lens = batch.seq_lens[g.start : g.start + len(g.rooms)]
        self.exchange.begin(self.step, self.groups, self.frees)
        self._exchanged = time.perf_counter() - self._began

    def end_step(self) -> StepTimes | None:
        """Record the last step's breakdown, once its last output came back (``begin`` calls this for
        the previous step); the breakdown, or None when there is no completed step to record."""
        if self._ended <= self._began:
            return None
        step_s = self._ended - self._began
        self.step_s += EWMA * (step_s - self.step_s)
        self.wait_s += EWMA * (self._waited - self.wait_s)
        dense = max(step_s - self._waited - self._local - self._exchanged, 0.0)
        times = StepTimes(dense, self._local, self._waited, self._exchanged, self._executor)
        self.breakdown.ewma(times)
        self.recent.append(times)
        self._began = self._ended
        return times

    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.device = q.device
        tic = time.perf_counter()
        self.exchange.submit(self.step, layer, self.groups, q, k, v)
        self._submitted = time.perf_counter()
        self._exchanged += self._submitted - tic

    def wait(self, layer: int) -> torch.Tensor:
        tic = time.perf_counter()
        self._local += tic - self._submitted
        outs, executor_s = [], 0.0
        for g in self.groups:
            outs.append(self.exchange.wait(self.step, layer, g, self.timeout_s).to(self.device))
            executor_s = max(executor_s, self.exchange.executor_s)
        self._executor += executor_s
        self._ended = time.perf_counter()
        self._waited += self._ended - tic
        return outs[0] if len(outs) == 1 else torch.cat(outs)
