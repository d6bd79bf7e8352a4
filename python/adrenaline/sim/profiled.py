"""The cost model from a measured profile, and a profile computed from the analytic model.

``ProfileCost`` answers ``CostModel`` from ``python -m adrenaline.profile``'s curves (this
machine, measured). On a CPU machine the decode instance's cores also run its front end and
whatever else is placed there; their CPU per streamed token (the profile's front end, plus
``host_ms_per_token`` for other processes, e.g. a benchmark's client and router) is added to
each decode step, per token it streams. The profile has neither memory sizes nor a PD transfer
curve: pools come from the deployment's flags, the transfer from a stated bandwidth.

``profile_of`` goes the other way: it tabulates an analytic model as a ``Profile``, so the
runtime's load-aware policy, which reads profiles, decides on simulated hardware exactly as it
would on measured curves.
"""

from __future__ import annotations

from datetime import datetime, timezone

from adrenaline.core.profile import Curve, Grid, Profile
from adrenaline.sim.cost import AnalyticCost
from adrenaline.sim.model import ModelSpec


class ProfileCost:
    def __init__(
        self,
        profile: Profile,
        model: ModelSpec,
        kv_tokens: int,
        transfer_bw: float = 1e9,  # bytes/s: PD KV transfer, not in the profile (loopback-TCP-class)
        transfer_latency: float = 200e-6,
        host_ms_per_token: float = 0.0,
        prefill_cores: int | None = None,
    ) -> None:
        """``prefill_cores``: the cores a prefill instance (and its executor) runs on, of the
        profile's; prompts run at the profile's prefill rate with the others held away. None: all."""
        self.profile, self.model, self.kv_tokens = profile, model, kv_tokens
        self.per_token_ms = profile.frontend_ms_per_token + host_ms_per_token
        total = profile.executor_threads + profile.prefill_threads  # the profile's cores
        self.cores_away = total - min(prefill_cores or total, total)
        self.transfer_bw, self.transfer_latency = transfer_bw, transfer_latency

    def prefill_time(self, tokens: int, attn_pairs: float, exec_share: float = 0.0) -> float:
        """At the profile's rate with the cores it cannot use held away: those outside its own
        and, while the executor works, the executor's (the same cores when they are partitioned
        apart; an executor time-sharing the prefill's own cores is not priced)."""
        busy = self.profile.executor_threads if exec_share > 0 else 0
        return self.profile.prefill_ms(tokens, attn_pairs, max(self.cores_away, busy)) / 1e3

    def dense_time(self, rows: int) -> float:
        """The forward's dense part, the scheduler's own work around it and the CPU the step's
        streamed tokens cost on the same cores (measured; an older profile has neither)."""
        prof = self.profile
        return (prof.dense_ms(rows) + prof.overhead_ms(rows) + rows * self.per_token_ms) / 1e3

    def attention_time(self, rows: int, context: int) -> float:
        return self.profile.num_layers * self.profile.local_attention_ms(rows, context) / 1e3

    def executor_time(self, rows: int, context: int, share: float) -> float:
        return self.profile.num_layers * self.profile.executor_attention_ms(rows, context) / 1e3

    def exchange_time(self, rows: int) -> float:
        return self.profile.num_layers * self.profile.exchange_ms(rows) / 1e3

    def kv_transfer_time(self, tokens: int) -> float:
        return tokens * self.model.kv_bytes_per_token / self.transfer_bw + self.transfer_latency

    def kv_capacity_tokens(self) -> int:
        return self.kv_tokens


def profile_of(cost: AnalyticCost, share: float, max_batch: int = 1024, max_ctx: int = 1 << 22) -> Profile:
    """The analytic model at executor SM ``share``, tabulated on a grid wide enough to interpolate
    (the analytic curves are linear in context and piecewise linear in batch)."""
    layers = cost.model.layers
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch]
    contexts = [1, 1024, 16384, 262144, max_ctx]

    def grid(fn) -> Grid:
        return Grid(batches, contexts, [[fn(b, c) * 1e3 / layers for c in contexts] for b in batches])

    exchange = [(cost.exchange_time(b) - cost.gpu.link_latency) * 1e3 / layers for b in batches]
    prefill_rate = [4096 / cost.prefill_time(4096, 4096 * 2048, s) for s in (0.0, share)]
    return Profile(
        model=cost.model.name,
        dtype="bfloat16",
        device=cost.gpu.name,
        machine=f"analytic {cost.gpu.name} x{cost.tp}",
        num_layers=layers,
        executor_threads=1,  # "1" stands for the executor's SM share; 0 for none
        prefill_threads=1,
        decode_dense=Curve(batches, [cost.dense_time(b) * 1e3 for b in batches]),
        local_attention=grid(cost.attention_time),
        executor_attention=grid(lambda b, c: cost.executor_time(b, c, share)),
        executor_threads_scaling=Curve([1], [1.0]),
        exchange=Curve(batches, exchange),
        prefill_interference=Curve([0, 1], prefill_rate),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
