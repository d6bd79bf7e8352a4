"""The offload sweep (issue 13): static ratios 0, 1, 2, 4, 8, all and the load-aware policy, on the
workloads of ``bench/workloads.py``; run by ``python -m adrenaline.bench.offload --sweep``.

Per workload, two 1P1D deployments (``bench.pd.pd_pair``: the prefill instance and its attention
executor on the first half of the cores, the decode instance on the rest). The first runs the static
policy and changes its ratio live between runs (``/set_internal_state``), so one startup serves all
six ratios; ratio 0 is plain PD (its executor idles). The second runs the load-aware policy. Both
instances' prefix caches are flushed before each run: the client draws the same prompts each time.
A workload's streams run together (bursts start ``start_s`` into the steady stream); throughput is
all streams' output tokens over the longest stream's duration, TPOT is the steady stream's (the
decode-heavy one the SLO is about), TTFT p99 and the longest gap are the worst stream's.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from adrenaline.bench.pd import pd_pair
from adrenaline.bench.serving import run_client
from adrenaline.bench.workloads import STATIC_RATIOS, WORKLOADS, Workload

NAMES = {"inf": "all"}  # how a ratio reads in the table
Results = dict[str, dict[str, dict[str, float] | None]]  # workload -> policy -> figures (None: failed)
STATIC = ("--attention-offload-policy", "static", "--attention-offload-ratio", "1")  # then set live


def post(port: int, path: str, body: dict | None = None) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body or {}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def set_ratio(decode_port: int, ratio: str) -> None:
    answer = post(decode_port, "/set_internal_state", {"server_args": {"attention_offload_ratio": ratio}})
    if "true" not in answer:
        raise RuntimeError(f"the decode instance refused offload ratio {ratio}: {answer}")


def scaled(w: Workload, scale: float) -> Workload:
    """``w`` with ``scale`` times the requests and concurrency of each stream (at least one)."""
    streams = tuple(
        dataclasses.replace(
            s,
            num_prompts=max(round(s.num_prompts * scale), 1),
            max_concurrency=max(round(s.max_concurrency * scale), 1),
        )
        for s in w.streams
    )
    return dataclasses.replace(w, streams=streams)


def run_workload(router_port: int, model: str, w: Workload) -> dict[str, float]:
    """All of ``w``'s streams at once, each from its ``start_s``; the combined figures. The
    clients start once all have imported (``bench.client --start-file``): a client's imports take
    ~10 s of CPU, which would otherwise land in the streams already running."""
    results: list[dict | None] = [None] * len(w.streams)
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory() as tmp:
        start_file = os.path.join(tmp, "start")

        def one(i: int) -> None:
            try:
                start = (start_file, w.streams[i].start_s)
                results[i] = run_client(router_port, model, w.streams[i].client_args(), start)
            except BaseException as e:  # re-raised below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(w.streams))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while len(glob.glob(start_file + ".ready.*")) < len(threads) and time.monotonic() < deadline:
            if not any(t.is_alive() for t in threads):
                break
            time.sleep(0.05)
        with open(start_file + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(start_file + ".tmp", start_file)  # whole, or not there yet
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    steady = results[0]
    return {
        "output_throughput": sum(r["total_output_tokens"] for r in results)
        / max(r["duration"] for r in results),
        "median_tpot_ms": steady["median_tpot_ms"],
        "p99_tpot_ms": steady["p99_tpot_ms"],
        "max_itl_ms": max(r["max_itl_ms"] for r in results),
        "p99_ttft_ms": max(r["p99_ttft_ms"] for r in results),
    }


def measure(
    ports: tuple[int, int, int], model: str, w: Workload, ratio: str | None
) -> dict[str, float] | None:
    """One run on a deployment (router, decode, prefill ports), at ``ratio`` if given; None: failed."""
    router, decode, prefill = ports
    try:
        if ratio is not None:
            set_ratio(decode, ratio)
        for port in (prefill, decode):
            post(port, "/flush_cache")
        return run_workload(router, model, w)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # a failed row, not a failed sweep
        print(f"run failed: {type(e).__name__}: {e}", flush=True)
        return None


def sweep(args: argparse.Namespace, extra: list[str], model: str, load_aware: tuple[str, ...]) -> None:
    results: Results = {}
    total = len(args.workloads) * (len(STATIC_RATIOS) + 1)
    began = time.monotonic()
    for name in args.workloads:
        w = scaled(WORKLOADS[name], args.scale)
        decode_kv = ("--max-total-tokens", str(w.decode_max_total_tokens))
        results[name] = {}
        # (decode flags, the ratios set live: None for a policy without one) per deployment
        for flags, ratios in ((STATIC, STATIC_RATIOS), (load_aware, (None,))):
            prefill_extra = ("--enable-attention-offload",)
            with pd_pair(extra, args.log_dir, prefill_extra, (*decode_kv, *flags)) as ports:
                for ratio in ratios:
                    label = f"static {NAMES.get(ratio, ratio)}" if ratio is not None else "load-aware"
                    res = results[name][label] = measure(ports, model, w, ratio)
                    done = sum(len(r) for r in results.values())
                    tput = f"{res['output_throughput']:.1f} tok/s" if res else "FAILED"
                    print(
                        f"[{done}/{total}, {time.monotonic() - began:.0f} s] {name} / {label}: {tput}",
                        flush=True,
                    )
    print(f"\nserver args: {' '.join(extra) or '(defaults)'}; load-aware flags: {' '.join(load_aware)}; "
          f"scale {args.scale:g}")  # fmt: skip
    print(table(results))
    if args.plot:
        plot(results, Path(args.plot))
        print(f"plot: {args.plot}")


def table(results: Results) -> str:
    lines = [
        "| workload | policy | output tok/s | vs static 0 (plain PD) | TPOT p50 / p99 (ms) | max gap (s) "
        "| TTFT p99 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, by_policy in results.items():
        plain = (by_policy.get("static 0") or {}).get("output_throughput")
        for policy, r in by_policy.items():
            if r is None:
                lines.append(f"| {name} | {policy} | failed | | | | |")
                continue
            ratio = f"{r['output_throughput'] / plain:.2f}x" if plain else "-"
            lines.append(
                f"| {name} | {policy} | {r['output_throughput']:.1f} | {ratio} | "
                f"{r['median_tpot_ms']:.0f} / {r['p99_tpot_ms']:.0f} | {r['max_itl_ms'] / 1000:.2f} | "
                f"{r['p99_ttft_ms']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    """One column per workload: throughput, TPOT p99 and TTFT p99 per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [
        ("output_throughput", "output tok/s"),
        ("p99_tpot_ms", "TPOT p99 (ms)"),
        ("p99_ttft_ms", "TTFT p99 (ms)"),
    ]
    fig, axes = plt.subplots(len(shown), len(results), figsize=(4.5 * len(results), 8), squeeze=False)
    for col, (name, by_policy) in enumerate(results.items()):
        policies = [p for p, r in by_policy.items() if r is not None]
        for row, (metric, label) in enumerate(shown):
            ax = axes[row][col]
            colours = ["tab:orange" if p == "load-aware" else "tab:blue" for p in policies]
            ax.bar(range(len(policies)), [by_policy[p][metric] for p in policies], color=colours)
            ax.set_xticks(range(len(policies)), [p.removeprefix("static ") for p in policies], fontsize=8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(name)
    fig.suptitle("static offload ratios (blue) vs load-aware (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
