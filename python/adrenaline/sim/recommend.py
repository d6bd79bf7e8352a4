"""Recommend a P:D split, offload ratio and executor share for a GPU count, workload and SLO.

The figure of merit is goodput: the highest Poisson arrival rate whose TTFT p99 and TPOT p99 stay
within the SLOs (without SLOs: the saturated throughput). A rate is found by bisection between 0
and the closed-loop saturated rate. The search is coordinate-wise, to stay within a minute:
(1) every split, plain PD and offloading at the default ratio and share; (2) at the best
offloading split, other ratios and the load-aware policy; (3) there, other executor shares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adrenaline.sim.metrics import Summary
from adrenaline.sim.run import Setup
from adrenaline.sim.workload import synthetic

RATIOS = (0.3, 0.5, 1.0, 1.5)
SHARES = (0.15, 0.2, 0.4, 0.5)


@dataclass
class Candidate:
    setup: Setup
    rate: float  # goodput, requests/s
    summary: Summary | None


def meets(s: Summary, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    return (ttft_ms is None or s.ttft_p99_ms <= ttft_ms) and (tpot_ms is None or s.tpot_p99_ms <= tpot_ms)


def goodput(
    setup: Setup,
    shape: str,
    n: int,
    ttft_ms: float | None,
    tpot_ms: float | None,
    steps: int = 4,
    seed: int = 0,
) -> Candidate:
    conc = 2 * setup.dep.max_running * setup.dep.decode
    _, sat = setup.with_(concurrency=conc).run(synthetic(shape, n, None, seed))
    if ttft_ms is None and tpot_ms is None:
        return Candidate(setup, sat.request_s, sat)
    lo, hi, best = 0.0, sat.request_s * 1.05, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        _, s = setup.run(synthetic(shape, n, mid, seed))
        lo, hi, best = (mid, hi, s) if meets(s, ttft_ms, tpot_ms) else (lo, mid, best)
    return Candidate(setup, lo, best)


def recommend(
    base: Setup,
    gpus: int,
    shape: str,
    n: int,
    ttft_ms: float | None,
    tpot_ms: float | None,
    progress: Callable[[Candidate], None] = lambda c: None,
) -> list[Candidate]:
    """Every evaluated candidate, best goodput first."""
    tried: list[Candidate] = []

    def score(setup: Setup) -> Candidate:
        c = goodput(setup, shape, n, ttft_ms, tpot_ms)
        tried.append(c)
        progress(c)
        return c

    splits = [(p, gpus - p) for p in range(1, gpus)]
    for p, d in splits:
        score(base.with_(prefill=p, decode=d, offload=False))
    offl = [score(base.with_(prefill=p, decode=d, offload=True, policy="static")) for p, d in splits]
    best = max(offl, key=lambda c: c.rate).setup
    tuned = [score(best.with_(ratio=r)) for r in RATIOS] + [score(best.with_(policy="load-aware"))]
    best = max([*tuned, *(c for c in offl if c.setup is best)], key=lambda c: c.rate).setup
    for s in SHARES:
        score(best.with_(executor_share=s))
    return sorted(tried, key=lambda c: -c.rate)
