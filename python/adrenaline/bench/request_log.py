"""Writing a benchmark run's request log (``--request-log PATH``; format: ``core.run_log``).

The deployment comes from the running servers (``max_total_num_tokens`` of the pools as they
report them, the executor's pool, page size, running cap, chunk budget), the client's concurrency,
and the decode instance's offload flags as the runtime's own parser reads them; the measured
figures are the ones the capacity planner predicts: output throughput, TPOT p50, mean decode batch.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from collections.abc import Sequence

from adrenaline.bench.cpu_use import cores_of
from adrenaline.core.run_log import Run, append_run

MEASURED = ("output_throughput", "median_tpot_ms", "p99_tpot_ms", "median_ttft_ms", "duration")


def internal_state(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=30) as r:
        return json.loads(r.read())["internal_states"][0]


def mean_batch(before: dict, after: dict) -> float:
    """Mean requests per forward pass between two ``stats`` snapshots (the runtime's counters)."""
    passes = after["forward_passes"] - before["forward_passes"]
    return (after["batched_requests"] - before["batched_requests"]) / max(passes, 1)


def offload_settings(flags: Sequence[str]) -> dict:
    """The decode instance's offload policy, as the runtime's own argument parser reads its flags."""
    from adrenaline.server.args import AdrenalineArgs

    ap = argparse.ArgumentParser()
    AdrenalineArgs.add_cli_args(ap)
    a = AdrenalineArgs.from_cli_args(ap.parse_known_args(list(flags))[0])
    static = a.attention_offload_policy == "static"
    ratio = (a.attention_offload_ratio or 0.0) if static else None
    return {
        "offload_policy": "none" if static and not ratio else a.attention_offload_policy,
        "offload_ratio": ratio,
        "max_offloaded": a.max_offloaded_requests,
        "tpot_slo_ms": a.tpot_slo_ms,
        "ttft_slo_ms": a.ttft_slo_ms,
        "offload_profile": a.offload_profile,
    }


def describe(decode_port: int, prefill_port: int | None, decode_flags: Sequence[str], clients: int) -> dict:
    """The deployment as the running servers report it (call while they are up)."""
    d = internal_state(decode_port)
    dep = {
        "mode": "pd" if prefill_port else "single",
        "prefill": 1 if prefill_port else 0,
        "decode": 1,
        "page_size": d["kv_cache"]["page_size"],
        "max_running": d["effective_max_running_requests_per_dp"],
        "chunk_budget": d["chunked_prefill_size"],
        "decode_kv_tokens": d["max_total_num_tokens"],
        "concurrency": clients,
        "flags": list(decode_flags),
        "cores": len(os.sched_getaffinity(0)),  # the machine's, shared by the servers, router, client
        "decode_cores": cores_of(decode_port),
    }
    if prefill_port:
        p = internal_state(prefill_port)
        ex = p["disaggregation"].get("executor", {})
        dep["prefill_kv_tokens"] = p["max_total_num_tokens"]
        dep["prefill_cores"] = cores_of(prefill_port)
        dep["executor_kv_tokens"] = ex["num_pages"] * p["kv_cache"]["page_size"] if "num_pages" in ex else 0
        dep.update(offload_settings(decode_flags))
        dep["offload"] = dep["offload_policy"] != "none" and dep["executor_kv_tokens"] > 0
    return dep


def log_run(
    args: argparse.Namespace, run: str, result: dict, before: dict, after: dict,
    decode_port: int, prefill_port: int | None = None, decode_flags: Sequence[str] = (),
) -> None:  # fmt: skip
    """Append ``run`` (``run_client``'s result; decode ``stats`` before and after) to
    ``args.request_log``, if given. Call while the servers are up."""
    if not getattr(args, "request_log", None):
        return
    measured = {k: result[k] for k in MEASURED if k in result}
    measured["mean_decode_batch"] = mean_batch(before, after)
    measured["cpu_ms_per_token"] = result.get("cpu_ms_per_token", {})
    dep = describe(decode_port, prefill_port, decode_flags, args.max_concurrency)
    append_run(args.request_log, Run(run, dep, measured, result["requests"]))
