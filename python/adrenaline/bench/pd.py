"""Single instance vs 1P1D (prefill + decode behind SGLang's router), same machine, same workloads.

    python -m adrenaline.bench.pd --num-prompts 32 --max-concurrency 16 -- --dtype bfloat16
    python -m adrenaline.bench.pd --pd-transport tcp mooncake --mixes prefill-heavy prompt-8k

For each mix (decode-heavy: short prompts, long outputs; prefill-heavy: long prompts, short
outputs) it serves the default model once as a single instance on all cores, then as a 1P1D pair
with the prefill instance on the first half of the cores and the decode instance on the second,
and drives each with ``sglang.benchmark.serving``, once per ``--pd-transport`` (side by side).
Prints a markdown table with throughput, TTFT/TPOT p50/p99, the longest gap between two chunks
of a stream and, per request, the KV bytes the prefill instance sent, the time its loop spent
handing them to the data plane (KV send) and the time from its prompt computed to the decode
side's acknowledgement (KV handoff).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from adrenaline.bench.cpu_use import summary
from adrenaline.bench.request_log import internal_state, log_run
from adrenaline.bench.serving import parse_args, run_client, server
from adrenaline.launch_pd import Cluster, router_command, wait_healthy, wait_serving
from adrenaline.models.default_model import resolve_model_path
from adrenaline.procs import free_port

# prompt-8k: as long as the default model's 8192-token context allows (the random-ids dataset's
# prompts come back up to ~5 % longer once tokenized)
MIXES = {"decode-heavy": (64, 256), "prefill-heavy": (1024, 16), "prompt-8k": (7600, 16)}


@contextmanager
def pd_pair(extra: list[str], log_dir: str | None, prefill_extra: tuple = (), decode_extra: tuple = ()):
    """Prefill on the first half of the cores, decode on the rest, router in front.

    Yields (router port, decode port, prefill port); ``*_extra`` flags go to one role only.
    """
    cores = os.cpu_count() or 2
    half = max(cores // 2, 1)
    split = (f"0-{half - 1}", f"{half}-{cores - 1}" if cores > 1 else "0")
    pp, dp, bp, rp = free_port(), free_port(), free_port(), free_port()
    base = [sys.executable, "-m", "adrenaline.launch_server", "--host", "127.0.0.1"]
    cluster = Cluster(log_dir)
    try:
        cluster.start("prefill", ["taskset", "-c", split[0], *base, "--port", str(pp),
                                  "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                  str(bp), *extra, *prefill_extra])  # fmt: skip
        cluster.start("decode", ["taskset", "-c", split[1], *base, "--port", str(dp),
                                 "--disaggregation-mode", "decode", *extra, *decode_extra])  # fmt: skip
        urls = [f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{dp}"]
        wait_healthy(cluster, urls)
        cluster.start("router", router_command("127.0.0.1", rp, [(urls[0], bp)], [urls[1]]))
        wait_serving(cluster, f"http://127.0.0.1:{rp}")
        yield rp, dp, pp
    finally:
        cluster.stop()


def pd_stats(port: int) -> dict:
    return internal_state(port)["disaggregation"]


def kv_per_request(before: dict, after: dict) -> tuple[float, float, float]:
    """KV MiB, KV send ms and KV handoff ms per request, from the prefill side's statistics."""
    n = max(after["transfers"] - before["transfers"], 1)
    delta = {k: (after[k] - before[k]) / n for k in ("kv_bytes", "kv_send_s", "handoff_s")}
    return delta["kv_bytes"] / 2**20, delta["kv_send_s"] * 1e3, delta["handoff_s"] * 1e3


def row(name: str, mix: str, res: dict, kv: tuple[float, float, float] | None) -> str:
    cells = "{:.2f} | {:.1f} | {:.1f}".format(*kv) if kv is not None else "- | - | -"
    return (
        f"| {name} | {mix} | {res['output_throughput']:.1f} | {res['request_throughput']:.2f} | "
        f"{res['median_ttft_ms']:.0f} / {res['p99_ttft_ms']:.0f} | "
        f"{res['median_tpot_ms']:.0f} / {res['p99_tpot_ms']:.0f} | {res['max_itl_ms'] / 1000:.2f} | {cells} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--mixes", nargs="+", default=["decode-heavy", "prefill-heavy"], choices=list(MIXES))
    ap.add_argument(
        "--pd-transport", nargs="+", default=["tcp"], choices=["tcp", "nccl", "mooncake"],
        help="1P1D data planes to compare (one pair each)",
    )  # fmt: skip
    ap.add_argument("--log-dir", default=None, help="keep the instances' logs here")
    args, extra = parse_args(ap)
    model = resolve_model_path(None)
    rows = []
    for mix in args.mixes:
        args.input_len, args.output_len = MIXES[mix]
        port = free_port()
        with server(extra, port):
            before = internal_state(port)["stats"]
            res = run_client(port, model, args)
            log_run(args, f"single {mix}", res, before, internal_state(port)["stats"], port)
            rows.append(row("single", mix, res, None))
            print(f"  single {mix}: {summary(res['cpu_ms_per_token'])}", flush=True)
        for transport in args.pd_transport:
            pair_args = [*extra, "--pd-transport", transport]
            logs = None if args.log_dir is None else os.path.join(args.log_dir, f"{transport}-{mix}")
            with pd_pair(pair_args, logs) as (router_port, decode_port, prefill_port):
                start, before = internal_state(decode_port), pd_stats(prefill_port)
                res = run_client(router_port, model, args)
                end, after = internal_state(decode_port), pd_stats(prefill_port)
                run = f"1P1D {transport} {mix}"
                log_run(args, run, res, start["stats"], end["stats"], decode_port, prefill_port, pair_args)
            rows.append(row(f"1P1D {transport}", mix, res, kv_per_request(before, after)))
            print(f"  1P1D {transport} {mix}: {summary(res['cpu_ms_per_token'])}", flush=True)
        print("\n".join(rows[-1 - len(args.pd_transport) :]), flush=True)
    print(f"\nserver args: {' '.join(extra) or '(defaults)'}; {args.num_prompts} prompts, "
          f"concurrency {args.max_concurrency}; mixes (in/out): "
          + ", ".join(f"{m} {MIXES[m][0]}/{MIXES[m][1]}" for m in args.mixes))  # fmt: skip
    print(
        "| mode | mix | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | max gap (s) "
        "| KV MiB/req | KV send ms/req | KV handoff ms/req |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
