"""The CPU colocation share: how many cores the attention executor gets beside its prefill.

The CPU analogue of the paper's MPS SM cap (design notes, section 2.2): decode attention is
memory-bound, so a few cores give the executor most of what it can use, while every core taken
slows the prefill. From the profile we pick the smallest executor share that computes the
expected offloaded load within its per-layer budget, unless that would push the prefill below
the throughput its TTFT SLO needs; the prefill wins then (the load-aware policy offloads less).
The two processes are then pinned to disjoint cores, so neither's threads preempt the other's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from adrenaline.core.profile import Profile


@dataclass
class CoreSplit:
    executor: list[int]
    prefill: list[int]

    def apply(self, executor_pid: int, prefill_pid: int) -> None:
        """Pin both processes; each should also run ``torch.set_num_threads(len(its cores))``."""
        os.sched_setaffinity(executor_pid, self.executor)
        os.sched_setaffinity(prefill_pid, self.prefill)


def executor_need_ms(profile: Profile, threads: int, batch: int, context: int) -> float:
    """Per layer: the offloaded group's attention at ``threads`` threads, plus its exchange."""
    return profile.executor_attention_ms(batch, context, threads) + profile.exchange_ms(batch)


def choose_executor_threads(
    profile: Profile,
    cores: int,
    batch: int,
    context: int,
    budget_ms: float,
    min_prefill_tokens_per_s: float = 0.0,
) -> int:
    """Executor cores out of ``cores`` for an offloaded load of ``batch`` requests holding
    ``context`` KV tokens, whose attention + exchange must fit ``budget_ms`` per layer (the local
    attention it hides under). The prefill keeps at least one core, and at least
    ``min_prefill_tokens_per_s`` of throughput where any share allows it."""
    if cores <= 1:
        return 1  # one core: both share it
    shares = range(1, cores)
    prefill_ok = [k for k in shares if profile.prefill_tokens_per_s(k) >= min_prefill_tokens_per_s] or [1]
    enough = [k for k in prefill_ok if executor_need_ms(profile, k, batch, context) <= budget_ms]
    return min(enough) if enough else max(prefill_ok)


def split_cores(cores: list[int], executor_threads: int) -> CoreSplit:
    """The executor on the last ``executor_threads`` cores, the prefill on the rest (one core: shared)."""
    cores = sorted(cores)
    if len(cores) <= 1:
        return CoreSplit(list(cores), list(cores))
    k = min(max(executor_threads, 1), len(cores) - 1)
    return CoreSplit(cores[-k:], cores[:-k])
