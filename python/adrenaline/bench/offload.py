"""The headline: 1P1D plain PD vs 1P1D with attention offloading, same machine, same workload.

    python -m adrenaline.bench.offload --decode-max-total-tokens 1024 --ratio 4 -- --dtype bfloat16
    python -m adrenaline.bench.offload --policy load-aware [--offload-profile P.json] [--tpot-slo-ms T]
    python -m adrenaline.bench.offload --sweep [--workloads kv-bound ...] [--scale S] [--plot F.png]

A decode-heavy workload (short prompts, long outputs, many concurrent requests) against a decode
instance whose KV pool (``--decode-max-total-tokens``) bounds its batch. The prefill instance
(with the attention executor, when offloading) runs on the first half of the cores, the decode
instance on the other half. Prints output throughput, TPOT p50/p99, TTFT p99, the longest gap
between two chunks of any stream, the decode instance's mean batch size, the executor's peak KV
usage, and the throughput ratio. ``--sweep`` compares static ratios with the load-aware policy
on three workloads instead (``bench/sweep.py``).
"""

from __future__ import annotations

import argparse
import os
import threading

from adrenaline.bench.cpu_use import summary
from adrenaline.bench.pd import internal_state, pd_pair
from adrenaline.bench.request_log import log_run
from adrenaline.bench.serving import parse_args, run_client
from adrenaline.bench.sweep import sweep
from adrenaline.bench.workloads import WORKLOADS
from adrenaline.models.default_model import resolve_model_path


class ExecutorWatch:
    """Samples the executor's KV usage once a second while the benchmark runs."""

    def __init__(self, prefill_port: int) -> None:
        self.port, self.peak, self.samples = prefill_port, 0.0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            ex = internal_state(self.port)["disaggregation"].get("executor", {})
            if "kv_usage" in ex:
                self.samples.append(ex["kv_usage"])
                self.peak = max(self.peak, ex["kv_usage"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def load_aware_args(args: argparse.Namespace) -> list[str]:
    flags = ["--attention-offload-policy", "load-aware"]
    for flag in ("--offload-profile", "--tpot-slo-ms", "--ttft-slo-ms"):
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        flags += [flag, value] if value is not None else []
    return flags


def offload_args(args: argparse.Namespace) -> list[str]:
    """The offloading decode instance's policy flags."""
    if args.policy == "static":
        return ["--attention-offload-ratio", args.ratio]
    return load_aware_args(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-concurrency", type=int, default=48)
    ap.add_argument("--decode-max-total-tokens", type=int, default=1024)
    ap.add_argument("--policy", choices=["static", "load-aware"], default="static")
    ap.add_argument("--ratio", default="4", help="--attention-offload-ratio of a static offloading run")
    ap.add_argument("--offload-profile", default=None, help="load-aware: the profile (default: cached)")
    ap.add_argument("--tpot-slo-ms", default=None, help="load-aware: the decode step's bound")
    ap.add_argument("--ttft-slo-ms", default=None, help="load-aware: back off above this prefill TTFT")
    ap.add_argument(
        "--sweep", action="store_true", help="static ratios and load-aware on the sweep's workloads"
    )
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0, help="sweep: times the workloads' requests")
    ap.add_argument("--plot", default="offload_sweep.png", help="sweep: the figure's path ('' for none)")
    ap.add_argument("--log-dir", default=None)
    args, extra = parse_args(ap)
    model = resolve_model_path(None)
    if args.sweep:
        sweep(args, extra, model, tuple(load_aware_args(args)))
        return
    decode_kv = ("--max-total-tokens", str(args.decode_max_total_tokens))
    modes = {
        "plain PD": ((), (*decode_kv, "--attention-offload-ratio", "0")),
        "PD + offload": (("--enable-attention-offload",), (*decode_kv, *offload_args(args))),
    }
    rows, tput = [], {}
    for mode, (prefill_extra, decode_extra) in modes.items():
        slug = mode.replace(" + ", "_").replace(" ", "_")  # each deployment's logs apart
        logs = None if args.log_dir is None else os.path.join(args.log_dir, slug)
        with pd_pair(extra, logs, prefill_extra, decode_extra) as (router, decode, prefill):
            before = internal_state(decode)["stats"]
            watch = ExecutorWatch(prefill)
            res = run_client(router, model, args)
            watch.close()
            after = internal_state(decode)["stats"]
            log_run(args, mode, res, before, after, decode, prefill, [*extra, *decode_extra])
        passes = after["forward_passes"] - before["forward_passes"]
        batch = (after["batched_requests"] - before["batched_requests"]) / max(passes, 1)
        tput[mode] = res["output_throughput"]
        kv = f"{watch.peak:.1%}" if watch.samples else "-"
        rows.append(
            f"| {mode} | {res['output_throughput']:.1f} | "
            f"{res['median_tpot_ms']:.0f} / {res['p99_tpot_ms']:.0f} | {res['p99_ttft_ms']:.0f} | "
            f"{res['max_itl_ms'] / 1000:.2f} | {batch:.1f} | {kv} |"
        )
        print(rows[-1], flush=True)
        print(f"  {mode}: {summary(res['cpu_ms_per_token'])}", flush=True)
    print(f"\nserver args: {' '.join(extra) or '(defaults)'}; decode --max-total-tokens "
          f"{args.decode_max_total_tokens}; {args.num_prompts} prompts in {args.input_len} / out "
          f"{args.output_len}, concurrency {args.max_concurrency}; "
          f"offload {' '.join(offload_args(args))}")  # fmt: skip
    print("| mode | output tok/s | TPOT p50 / p99 (ms) | TTFT p99 (ms) | max gap (s) | mean decode batch "
          "| executor KV peak |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"throughput ratio (offload / plain): {tput['PD + offload'] / tput['plain PD']:.2f}x")


if __name__ == "__main__":
    main()
