"""What the scheduler reports about itself: ``/server_info`` internal state and ``/v1/loads``.

``/server_info`` asks through ``GetInternalStateReq``; ``/v1/loads`` has no request: SGLang's
TokenizerManager reads a ``LoadSnapshot`` the scheduler publishes in a shared-memory file, so we
publish one too (and remove the file at exit, which SGLang's own scheduler does not).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0


class Throttle:
    """Lets periodic housekeeping through at most once per ``interval_s`` (always when forced)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        return True


class ThroughputMeter:
    """Generated tokens per second over the last ``THROUGHPUT_WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, total_generated: int) -> None:
        now = time.monotonic()
        self._samples.append((now, total_generated))
        while now - self._samples[0][0] > THROUGHPUT_WINDOW_S:
            self._samples.popleft()

    @property
    def tokens_per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if time.monotonic() - t1 > THROUGHPUT_WINDOW_S:  # idle since: nothing recent
            return 0.0
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class SchedulerState:
    """Reads live numbers off a ``Scheduler`` in the shapes SGLang's front end expects."""

    def __init__(
        self, scheduler, info: dict[str, Any], pd=None, paused: Callable[[], bool] = lambda: False
    ) -> None:
        self.scheduler = scheduler
        self.pd = pd  # the PD role's TransferManager, if any
        self.paused = paused  # whether the front end paused generation
        self.info = info  # static facts: model, dtype, device, startup time...
        self.throughput = ThroughputMeter()

    def kv(self) -> dict[str, Any]:
        s = self.scheduler
        a = s.allocator
        used_tokens = a.num_used * a.page_size
        total = a.num_pages * a.page_size
        return {
            "page_size": a.page_size,
            "num_pages": a.num_pages,
            "num_used_pages": a.num_used,
            "num_cached_pages": a.num_cached,
            "num_used_tokens": used_tokens,
            "max_total_num_tokens": total,
            "token_usage": used_tokens / total if total else 0.0,
        }

    def cache_hit_rate(self) -> float:
        st = self.scheduler.stats
        seen = st.prompt_tokens_cached + st.prompt_tokens_computed
        return st.prompt_tokens_cached / seen if seen else 0.0

    def internal_state(self) -> dict[str, Any]:
        s = self.scheduler
        kv = self.kv()
        return {
            **self.info,
            "engine": "adrenaline",
            "num_running_reqs": len(s.running),
            "num_waiting_reqs": len(s.waiting),
            "kv_cache": kv,
            "max_total_num_tokens": kv["max_total_num_tokens"],
            "token_usage": kv["token_usage"],
            "last_gen_throughput": self.throughput.tokens_per_s,
            "cache_hit_rate": self.cache_hit_rate(),
            "stats": asdict(s.stats),
            "effective_max_running_requests_per_dp": s.config.max_running_requests,
            "chunked_prefill_size": s.config.chunked_prefill_size,
            "disaggregation": self._disaggregation(),
        }

    def _disaggregation(self) -> dict[str, Any]:
        info = self.pd.info() if self.pd is not None else {"role": "null"}
        placement = self.scheduler.placement.info()
        if placement is not None:
            info["offload"] = placement
        return info

    def queued_tokens(self) -> tuple[int, int]:
        """(tokens of waiting requests, of requests whose KV is still to come from a prefill
        instance), as SGLang's ``num_total_tokens`` and ``num_active_tokens`` count them."""
        s = self.scheduler
        waiting = sum(r.seq_len for r in s.waiting)
        awaiting = sum(r.seq_len for r in s.arriving)
        awaiting += sum(r.seq_len for r in s.waiting if s.hooks.prefilled_elsewhere(r))
        return waiting, awaiting

    def load_snapshot(self):
        from sglang.srt.managers.load_snapshot import LoadSnapshot, MemoryMetrics, QueueMetrics

        s = self.scheduler
        kv = self.kv()
        waiting_tokens = sum(r.seq_len - r.num_computed for r in s.waiting)
        queued, awaiting = self.queued_tokens()
        total = kv["num_used_tokens"] + queued
        return LoadSnapshot(
            timestamp=time.time(),
            dp_rank=0,
            num_running_reqs=len(s.running),
            num_waiting_reqs=len(s.waiting),
            num_waiting_uncached_tokens=waiting_tokens,
            num_used_tokens=kv["num_used_tokens"],
            num_total_tokens=total,
            num_active_tokens=max(0, total - awaiting),
            max_total_num_tokens=kv["max_total_num_tokens"],
            max_running_requests=s.config.max_running_requests,
            token_usage=kv["token_usage"],
            gen_throughput=self.throughput.tokens_per_s,
            cache_hit_rate=self.cache_hit_rate(),
            utilization=kv["token_usage"],
            total_prefill_uncached_tokens=s.stats.prompt_tokens_computed,
            memory=MemoryMetrics(
                weight_gb=self.info.get("weight_gb", 0.0),
                kv_cache_gb=self.info.get("kv_cache_gb", 0.0),
                graph_gb=0.0,
                token_capacity=kv["max_total_num_tokens"],
            ),
            queues=QueueMetrics(
                waiting=len(s.waiting),
                grammar=0,  # grammars compile at admission, in the loop: no queue waits for them
                paused=len(s.running) if self.paused() else 0,
                retracted=sum(r.retractions > 0 for r in s.waiting),
                prealloc_ready=0,  # a decode request's pages are reserved as it is admitted
            ),
        )


class LoadPublisher:
    """Writes ``LoadSnapshot`` where SGLang's TokenizerManager reads it for ``/v1/loads``."""

    def __init__(self, port_args, state: SchedulerState, interval_s: float = 0.5) -> None:
        from sglang.srt.managers.load_snapshot import ShmLoadSnapshotWriter, shm_path_for

        self.state = state
        self.throttle = Throttle(interval_s)
        self.path = shm_path_for(port_args.instance_id)
        self.writer = ShmLoadSnapshotWriter(self.path, dp_size=1, dp_rank=0)

    def maybe_publish(self, force: bool = False) -> None:
        if not self.throttle.due(force):
            return
        try:
            self.writer.write(self.state.load_snapshot())
        except Exception as e:  # a stale /v1/loads must never stop serving
            logger.warning("load snapshot not published: %s", e)

    def close(self) -> None:
        self.writer.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
