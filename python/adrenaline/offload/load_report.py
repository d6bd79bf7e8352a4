"""A prefill instance's load as its decode peers see it: the input of the policy's prefill protection.

The prefill side samples its queue (routed requests not yet prefilled) and its times to first
token over fixed intervals, and sends the recent samples, with its executor's ledger as that decode
instance shares it, in every ``KVDone``. Every request a decode instance routes through this prefill
instance brings one back, so the numbers are as fresh as the decisions about that executor; they
are per-interval (the largest queue, the mean TTFT) so that one slow prompt does not read as a
trend, and the policy backs off while the queue or TTFT rises over consecutive intervals.
"""

from __future__ import annotations

import time
from collections import deque

from adrenaline.offload.ledger import share
from adrenaline.offload.protocol import ExecutorStats, LoadReport

INTERVAL_S = 0.5
HISTORY = 8  # intervals kept


class LoadMeter:
    def __init__(self, interval_s: float = INTERVAL_S, history: int = HISTORY) -> None:
        self.interval_s = interval_s
        self.queue: deque[int] = deque(maxlen=history)  # largest queue per interval, oldest first
        self.ttft_ms: deque[float] = deque(maxlen=history)  # mean TTFT per interval that had any
        self._queue = 0
        self._ttfts: list[float] = []
        self._since = time.monotonic()

    def sample(self, queue: int, now: float | None = None) -> None:
        """The current queue length (every loop iteration); closes the interval when it is over."""
        now = time.monotonic() if now is None else now
        self._queue = max(self._queue, queue)
        if now - self._since < self.interval_s:
            return
        self.queue.append(self._queue)
        if self._ttfts:
            self.ttft_ms.append(sum(self._ttfts) / len(self._ttfts))
        self._queue, self._ttfts, self._since = queue, [], now

    def prefilled(self, ttft_s: float) -> None:
        """A prompt got its first token ``ttft_s`` after it arrived here."""
        self._ttfts.append(ttft_s * 1e3)

    def report(self, stats: ExecutorStats | None, client: str, page_size: int) -> LoadReport:
        """For decode instance ``client``; ``stats``: the executor's last (None: none here, or down)."""
        queue, ttft = list(self.queue), list(self.ttft_ms)
        if stats is None:
            return LoadReport(queue, ttft)
        mine = share(stats.capacity_tokens, stats.reserve_tokens, stats.committed, client)
        return LoadReport(
            queue, ttft, **mine, requests=stats.requests, context_tokens=stats.used_pages * page_size
        )
