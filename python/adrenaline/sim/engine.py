"""A discrete-event loop: callbacks run in time order, ties in the order they were scheduled.

Instances of the simulated cluster are state machines that schedule their own next event (a step
ending, a KV transfer landing); nothing here knows about them. Determinism matters more than
speed: two runs with the same seed give the same events in the same order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, time: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at ``time`` (not before now: the past cannot be changed)."""
        if time < self.now:
            raise ValueError(f"event at {time} is before now ({self.now})")
        heapq.heappush(self._queue, (time, next(self._seq), fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run(self, until: float = float("inf")) -> None:
        """Run events until the queue is empty or the next one is after ``until``."""
        while self._queue and self._queue[0][0] <= until:
            self.now, _, fn = heapq.heappop(self._queue)
            self.events += 1
            fn()

    @property
    def pending(self) -> int:
        return len(self._queue)
