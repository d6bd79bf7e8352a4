"""A benchmark run's request log (``core.run_log``) as a simulation: its requests, and its
deployment as defaults for the CLI's flags (a flag given on the command line still wins).

The benchmarks' client is closed-loop (``--max-concurrency`` clients, each sending its next
request when the last one ends), so a run replays as a closed loop of that many clients over the
logged requests in send order, not at the logged send times: those already contain the measured
latencies the simulation is to predict.

The benchmark's own client and its router ran on the same machine, unpinned: a log that measured
their CPU per token (``cpu_ms_per_token``) charges the decode instance its cores' share of it
(``--host-ms-per-token``), as they took it from the decode steps.
"""

from __future__ import annotations

from pathlib import Path

from adrenaline.core.run_log import Run, read_runs
from adrenaline.sim.workload import Spec

# deployment keys (bench.request_log.describe) that are CLI flags of the same name
SAME = (
    "prefill", "decode", "page_size", "max_running", "chunk_budget", "decode_kv_tokens",
    "prefill_kv_tokens", "executor_kv_tokens", "concurrency", "offload_ratio", "max_offloaded",
    "tpot_slo_ms", "ttft_slo_ms",
)  # fmt: skip


def is_run_log(path: str | Path) -> bool:
    """Whether ``path`` is a benchmark's run log (header lines) rather than a bare request list."""
    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    return first.lstrip().startswith('{"run"')


def pick(path: str | Path, name: str | None) -> Run:
    """The run called ``name``; without a name, the log's only PD run."""
    runs = [r for r in read_runs(path) if r.deployment["mode"] == "pd"]
    if name is not None:
        runs = [r for r in read_runs(path) if r.run == name]
    if len(runs) != 1:
        names = [r.run for r in read_runs(path)]
        raise SystemExit(f"{path}: name one run with --run (runs: {names})")
    return runs[0]


def specs(run: Run) -> list[Spec]:
    """The logged requests in send order, closed loop; ``max_new_tokens`` is the logged output
    length (the benchmarks ignore EOS)."""
    reqs = sorted(run.requests, key=lambda r: r["sent"])
    return [Spec(None, r["input_len"], r["output_len"], r["output_len"]) for r in reqs]


def rig_share(run: Run) -> float:
    """The benchmark client's and router's CPU per token on the decode instance's cores: theirs
    in proportion to the cores the decode instance holds (they ran on all of them)."""
    cpu, dep = run.measured.get("cpu_ms_per_token", {}), run.deployment
    if not cpu or not dep.get("cores"):
        return 0.0
    return (cpu.get("router", 0.0) + cpu.get("client", 0.0)) * dep["decode_cores"] / dep["cores"]


def flag_defaults(run: Run) -> dict:
    """The CLI's flags for the run's deployment."""
    dep = run.deployment
    if dep["mode"] != "pd":
        raise SystemExit(f"run {run.run!r} is a single instance; the simulator models PD clusters")
    out = {k: dep[k] for k in SAME if dep.get(k) is not None}
    out["offload"] = dep["offload"]
    out["host_ms_per_token"] = rig_share(run)
    if dep.get("prefill_cores"):
        out["prefill_cores"] = dep["prefill_cores"]
    if dep["offload"]:
        out["offload_policy"] = dep["offload_policy"]
    return out
