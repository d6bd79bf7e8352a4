"""Requests to simulate: synthetic length distributions, arrivals, and request-log replay.

Request log (JSONL, one request per line; ``bench.*`` writes it): ``{"arrival": 0.12,
"input_len": 312, "output_len": 200}``, arrival in seconds from the run's start; optional
``max_new_tokens`` (default ``output_len``: benchmarks run with ignore_eos). A log without
arrivals (``arrival`` absent) replays as closed-loop at the given concurrency.

The synthetic shapes are lognormal, clipped. ``sharegpt`` approximates the published ShareGPT
statistics (mean prompt ~300, mean output ~250 tokens, long right tails); these are assumptions,
not a sample of the data set.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

# name: (prompt median, prompt sigma, prompt cap, output median, output sigma, output cap)
SHAPES: dict[str, tuple[float, float, int, float, float, int]] = {
    "sharegpt": (220, 0.8, 3072, 190, 0.75, 1024),
    "long-prompt": (1800, 0.5, 3584, 150, 0.6, 512),
    "long-output": (250, 0.8, 1024, 900, 0.5, 3072),
}


@dataclass
class Spec:
    """One request as it reaches the router."""

    arrival: float | None  # None: closed loop, sent when a client is free
    input_len: int
    output_len: int
    max_new_tokens: int


def _lognormal(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(4, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def synthetic(
    shape: str, n: int, rate: float | None, seed: int = 0, context_scale: float = 1.0
) -> list[Spec]:
    """``n`` requests of ``shape``; Poisson arrivals at ``rate`` req/s (None: closed loop).
    ``context_scale`` multiplies the prompt median (the scaling study's context-length axis)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown workload {shape!r}; one of {sorted(SHAPES)}")
    pm, ps, pc, om, osg, oc = SHAPES[shape]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate:
            t += rng.expovariate(rate)
        inp = _lognormal(rng, pm * context_scale, ps, int(pc * context_scale))
        o = _lognormal(rng, om, osg, oc)
        out.append(Spec(t if rate else None, inp, o, o))
    return out


def read_log(path: str | Path) -> list[Spec]:
    specs = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out = int(d["output_len"])
            specs.append(Spec(d.get("arrival"), int(d["input_len"]), out, int(d.get("max_new_tokens", out))))
    if any(s.arrival is not None for s in specs):
        specs.sort(key=lambda s: s.arrival or 0.0)
        t0 = specs[0].arrival or 0.0
        for s in specs:
            s.arrival = (s.arrival or 0.0) - t0
    return specs


def write_log(path: str | Path, specs: list[Spec]) -> None:
    keys = ("arrival", "input_len", "output_len", "max_new_tokens")
    Path(path).write_text("".join(json.dumps({k: getattr(s, k) for k in keys}) + "\n" for s in specs))
