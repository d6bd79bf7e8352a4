"""Scheduler gauges for ``--enable-metrics``, served by SGLang's own ``/metrics`` endpoint.

SGLang runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, inherited by the
scheduler process) and ``/metrics`` aggregates every process's samples, so a few gauges created
here show up next to the TokenizerManager's request metrics. SGLang's ``SchedulerMetricsCollector``
is tied to its own scheduler's internals; we publish the same names for the numbers we have. An
offloading decode instance adds one histogram of where its offloaded steps' time goes.
"""

from __future__ import annotations

from dataclasses import fields

from adrenaline.offload.client import StepTimes
from adrenaline.offload.manager import OffloadManager
from adrenaline.server.state import SchedulerState, Throttle

STEP_BUCKETS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class SchedulerMetrics:
    def __init__(self, state: SchedulerState, model_name: str, interval_s: float = 1.0) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # after PROMETHEUS_MULTIPROC_DIR is set

        self.state = state
        self.throttle = Throttle(interval_s)
        self.labels = {"model_name": model_name, "engine_type": "adrenaline"}
        names = list(self.labels)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, labelnames=names, multiprocess_mode="mostrecent").labels(**self.labels)

        self.num_running_reqs = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "The number of KV tokens held by requests.")
        self.token_usage = gauge("sglang:token_usage", "The token usage.")
        self.gen_throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s).")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.forward_passes = Counter(
            "adrenaline:forward_passes", "Forward passes run by the scheduler.", labelnames=names
        ).labels(**self.labels)
        self.retractions = Counter(
            "adrenaline:retractions", "Requests retracted for lack of KV pages.", labelnames=names
        ).labels(**self.labels)
        self.offload_decisions = Counter(
            "adrenaline:offload_decisions",
            "Offload decisions of the load-aware policy, by reason (ok: offloaded).",
            labelnames=[*names, "reason"],
        )
        self._counted = (0, 0)
        self.offload_step = None
        if isinstance(state.scheduler.placement, OffloadManager):
            self.offload_step = Histogram(
                "adrenaline:offload_step_seconds",
                "Per offloaded decode step: dense, local_attention, executor_wait (blocked on the "
                "executor's outputs) and exchange (announcing the step, shipping q|k|v) seconds; "
                "and executor_attention, the executors' own attention time (alongside, not a part).",
                labelnames=[*names, "part"],
                buckets=STEP_BUCKETS,
            )
        self._decisions: dict[str, int] = {}

    def maybe_log(self, force: bool = False) -> None:
        if not self.throttle.due(force):
            return
        s = self.state.scheduler
        kv = self.state.kv()
        self.num_running_reqs.set(len(s.running))
        self.num_queue_reqs.set(len(s.waiting))
        self.num_used_tokens.set(kv["num_used_tokens"])
        self.token_usage.set(kv["token_usage"])
        self.gen_throughput.set(self.state.throughput.tokens_per_s)
        self.cache_hit_rate.set(self.state.cache_hit_rate())
        passes, retractions = s.stats.forward_passes, s.stats.retractions
        self.forward_passes.inc(passes - self._counted[0])
        self.retractions.inc(retractions - self._counted[1])
        self._counted = (passes, retractions)
        if self.offload_step is not None:
            for times in s.placement.completed_steps():
                self._observe(times)
        decisions = (s.placement.info() or {}).get("decisions", {})
        for reason, n in decisions.items():
            counter = self.offload_decisions.labels(**self.labels, reason=reason)
            counter.inc(n - self._decisions.get(reason, 0))
        self._decisions = dict(decisions)

    def _observe(self, times: StepTimes) -> None:
        for f in fields(times):
            part = f.name.removesuffix("_s")
            self.offload_step.labels(**self.labels, part=part).observe(getattr(times, f.name))
