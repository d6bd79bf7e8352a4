"""Measure every curve of the profile, with a progress bar; or reuse the cached one.

The points are few and chosen where the policy asks (decode batches up to 128, attention up to 16k
KV tokens a layer), so the whole run stays within ~2 minutes on a 2-core machine; ``quick``
measures two points per axis, for tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adrenaline.core.profile import Curve, Grid, Profile, load_profile, save_profile
from adrenaline.offload.profile_source import default_profile_path, machine
from adrenaline.profile.exchange import ExchangeRig
from adrenaline.profile.frontend import frontend_ms_per_token
from adrenaline.profile.interference import prefill_under_load
from adrenaline.profile.measure import Rig
from adrenaline.profile.overhead import OverheadRig


def rising(ys: list[float]) -> list[float]:
    """Running maximum: more work never costs less. On a shared machine a noisy point can dip
    below its neighbour; a policy priced on the dip would offload into it."""
    out: list[float] = []
    for y in ys:
        out.append(max(y, out[-1]) if out else y)
    return out


def rising_grid(ms: list[list[float]]) -> list[list[float]]:
    """``rising`` along context in each row, then along batch in each column."""
    rows = [rising(r) for r in ms]
    cols = [rising(list(c)) for c in zip(*rows)]
    return [list(r) for r in zip(*cols)]


@dataclass
class Plan:
    dense_batches: list[int]
    attn_batches: list[int]
    contexts: list[int]
    exchange_rows: list[int]
    prefill_tokens: int
    reps: int

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls([1, 4], [1, 4], [64, 256], [1, 4], 32, 2)
        return cls(
            [1, 2, 4, 8, 16, 32, 64, 128], [1, 4, 16, 64], [256, 1024, 4096, 16384], [1, 4, 16, 64], 256, 3
        )


def run_profile(
    model_path: str,
    dtype: str = "auto",
    executor_threads: int = 1,
    quick: bool = False,
    decode_threads: int | None = None,
    frontend: bool = False,
) -> Profile:
    """``decode_threads``: the decode instance's threads, which its dense work and local attention
    run on (default: every core this process may use). ``frontend``: also time a served stream's
    front-end CPU (``profile/frontend.py``; starts a server)."""
    plan = Plan.of(quick)
    cores = sorted(os.sched_getaffinity(0))
    executor_threads = min(executor_threads, len(cores))
    decode_threads = min(decode_threads or len(cores), len(cores))
    rig = Rig(model_path, dtype, max(plan.attn_batches), max(plan.contexts))
    mc, grid_points = rig.mc, len(plan.attn_batches) * len(plan.contexts)
    total = 3 * len(plan.dense_batches) + 2 * grid_points + len(cores) + len(plan.exchange_rows) + len(cores)
    total += 1 + frontend  # the longer prompt, the served stream
    bar = tqdm(total=total, desc="profiling", unit="point")

    def measure(fn, *args) -> float:
        value = fn(*args)
        bar.update(1)
        return value

    def grid(threads: int) -> Grid:
        ms = [
            [measure(rig.attention_ms, b, c, threads, plan.reps) for c in plan.contexts]
            for b in plan.attn_batches
        ]
        return Grid(plan.attn_batches, plan.contexts, rising_grid(ms))

    def dense_pass() -> list[float]:
        return [measure(rig.dense_ms, b, 3 * plan.reps, decode_threads) for b in plan.dense_batches]

    # the step's largest part, so measured twice, apart, keeping each point's faster: a burst of
    # other work on a shared machine (seconds) would otherwise raise a point, and ``rising`` the
    # points after it
    dense = dense_pass()
    steps = OverheadRig(mc, max(plan.dense_batches))
    try:  # cheap steps, so more of them: the fastest is the cost without the machine's other work
        overhead = [measure(steps.step_ms, b, 3 * plan.reps, decode_threads) for b in plan.dense_batches]
    finally:
        steps.close()
    local, executor = grid(decode_threads), grid(executor_threads)
    dense = [min(a, b) for a, b in zip(dense, dense_pass())]
    ref = plan.attn_batches[len(plan.attn_batches) // 2], plan.contexts[len(plan.contexts) // 2]
    threads = list(range(1, len(cores) + 1))
    scaling = [measure(rig.attention_ms, *ref, t, plan.reps) for t in threads]
    exchange = ExchangeRig(mc, rig.dtype, max(plan.exchange_rows))
    try:
        trips = [measure(exchange.round_trip_ms, r, plan.reps) for r in plan.exchange_rows]
    finally:
        exchange.close()
    heads = (mc.num_heads, mc.num_kv_heads, mc.head_dim)
    longer = 4 * plan.prefill_tokens  # the interference curve's prompt, and one 4x as long
    long_rate = measure(rig.prefill_tokens_per_s, longer, plan.reps)
    busy, prefill = prefill_under_load(
        lambda: measure(rig.prefill_tokens_per_s, plan.prefill_tokens, plan.reps), heads, rig.dtype, cores
    )
    dtype_name = str(rig.dtype).removeprefix("torch.")
    served = measure(frontend_ms_per_token, model_path, dtype_name) if frontend else 0.0
    bar.close()
    device = "cpu" if rig.device.type == "cpu" else torch.cuda.get_device_name(rig.device)
    return Profile(
        model=Path(model_path.rstrip("/")).name,
        dtype=dtype_name,
        device=rig.device.type,
        machine=machine(device),
        num_layers=mc.num_layers,
        executor_threads=executor_threads,
        prefill_threads=max(1, len(cores) - executor_threads),
        decode_dense=Curve(plan.dense_batches, rising(dense)),
        local_attention=local,
        executor_attention=executor,
        executor_threads_scaling=Curve(threads, scaling),
        exchange=Curve(plan.exchange_rows, rising(trips)),
        prefill_interference=Curve(busy, prefill),
        prefill_by_length=Curve([plan.prefill_tokens, longer], [prefill[0], long_rate]),
        decode_overhead=Curve(plan.dense_batches, rising(overhead)),
        frontend_ms_per_token=served,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def ensure_profile(model_path: str, dtype: str, device_name: str = "cpu", path: str | None = None) -> Profile:
    """The given or cached profile, measuring (and caching) it first when there is none."""
    target = Path(path) if path else default_profile_path(model_path, dtype, device_name)
    if target.exists():
        return load_profile(target)
    profile = run_profile(model_path, dtype)
    save_profile(profile, target)
    return profile
