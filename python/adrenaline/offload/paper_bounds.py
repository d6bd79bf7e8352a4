"""The paper's offload bounds (design notes, section 2.3), written as its formulas, from a profile.

``LoadAwarePolicy`` checks the same limits request by request against live load; these are the
closed forms, for capacity planning and for reading the policy against the paper:

- OB_mem  = min(sum_p HBM_p / HBM_d, sum_p BW_p / BW_d)   (free KV room, and attention bandwidth)
- OB_comp = (B_max - B_TPOT) / B_TPOT
- OB      = min(OB_mem, OB_comp), an offloaded:local ratio N/M.

On CPU "bandwidth" is read from the profile as attention throughput (KV tokens per ms): the
executor's at its share against the decode side's local one.
"""

from __future__ import annotations

from adrenaline.core.profile import Profile


def ob_mem(
    free_kv_prefill: list[float], free_kv_decode: float, bw_prefill: list[float], bw_decode: float
) -> float:
    """Memory bound: the prefill side's KV room and attention bandwidth, over the decode side's."""
    return min(sum(free_kv_prefill) / free_kv_decode, sum(bw_prefill) / bw_decode)


def ob_comp(b_max: int, b_tpot: int) -> float:
    """Compute bound: how far the dense batch may grow past what local attention allows."""
    return (b_max - b_tpot) / b_tpot


def offload_bound(ob_memory: float, ob_compute: float) -> float:
    return min(ob_memory, ob_compute)


def largest_batch(fits, limit: int = 1 << 14) -> int:
    """The largest b >= 0 with ``fits(b)``, for ``fits`` true up to some b and false beyond."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def b_tpot(profile: Profile, tpot_ms: float, context_per_request: int) -> int:
    """B_TPOT: the largest all-local batch whose decode step meets the TPOT SLO."""
    return largest_batch(lambda b: profile.step_ms(b, b * context_per_request) <= tpot_ms)


def b_max(profile: Profile, tpot_ms: float) -> int:
    """B_max: the largest batch whose dense work alone (all attention elsewhere) meets the SLO."""
    return largest_batch(lambda b: profile.dense_ms(b) <= tpot_ms)


def attention_bandwidth(profile: Profile, batch: int, context: int, executor: bool) -> float:
    """KV tokens attended per ms at this load, on the executor (its share) or locally."""
    ms = (
        profile.executor_attention_ms(batch, context)
        if executor
        else profile.local_attention_ms(batch, context)
    )
    return context / ms


def c1(offloaded_max_tokens: float, local_max_tokens: float, bound: float) -> bool:
    """C1: the offloaded load with the new request, at maximum sequence length, stays within OB."""
    return offloaded_max_tokens <= bound * local_max_tokens


def c2(offloaded: tuple[int, int], local: tuple[int, int], bw_ratio: float) -> bool:
    """C2: executor:decode ratios of batch and of total sequence length within the bandwidth ratio,
    so the remote attention stays under the local one. ``offloaded``/``local``: (batch, tokens)."""
    return all(o <= bw_ratio * max(loc, 1) for o, loc in zip(offloaded, local))
