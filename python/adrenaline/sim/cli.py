"""``python -m adrenaline.sim``: simulate a PD cluster, compare offloading, recommend a layout.

Examples::

    python -m adrenaline.sim --hardware a100-80g --model llama-2-7b --prefill 1 --decode 1 --compare-offload
    python -m adrenaline.sim --hardware h100 --model llama-3-70b --tp 4 --gpus 8 --recommend --tpot-slo-ms 60
    # predict a measured run (this machine's profile + a bench run's --request-log):
    python -m adrenaline.sim --profile prof.json --replay requests.jsonl --run "PD + offload"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from adrenaline.core.profile import load_profile
from adrenaline.offload.load_aware import Slo
from adrenaline.sim import replay
from adrenaline.sim.cluster import Deployment
from adrenaline.sim.cost import AnalyticCost
from adrenaline.sim.hardware import PRESETS, Assumptions, gpu
from adrenaline.sim.model import INLINE_CONFIGS, ModelSpec
from adrenaline.sim.profiled import ProfileCost
from adrenaline.sim.recommend import recommend
from adrenaline.sim.replay import is_run_log
from adrenaline.sim.report import gain, plot_runs, table
from adrenaline.sim.run import Setup
from adrenaline.sim.workload import SHAPES, read_log, synthetic

DERIVED = ("chunk_budget", "concurrency")  # Deployment fields whose default depends on other flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adrenaline.sim", description=__doc__.split("\n")[0])
    hw = p.add_argument_group("hardware and model")
    hw.add_argument("--hardware", choices=sorted(PRESETS), default="a100-80g", help="analytic GPU preset")
    hw.add_argument("--link", choices=["nvlink", "rdma"], default="nvlink", help="between PD instances")
    hw.add_argument("--tp", type=int, default=1, help="GPUs per instance (tensor parallel)")
    hw.add_argument("--profile", help="a measured profile (python -m adrenaline.profile) instead of a preset")
    hw.add_argument(
        "--host-ms-per-token",
        type=float,
        default=0.0,
        help="with --profile: CPU ms per streamed token of other processes on the decode cores "
        "(a replayed benchmark's client and router: from its log)",
    )
    hw.add_argument(
        "--prefill-cores",
        type=int,
        help="with --profile: the cores of the profile's machine a prefill instance runs on "
        "(default: all; a replayed benchmark: from its log)",
    )
    hw.add_argument(
        "--model", default=None, help=f"{sorted(INLINE_CONFIGS)} or an HF config.json (or its dir)"
    )
    wl = p.add_argument_group("workload")
    wl.add_argument("--workload", choices=sorted(SHAPES), default="sharegpt")
    wl.add_argument("--replay", help="a bench run's --request-log (its deployment gives the flags' "
                    "defaults) or JSONL of arrival, input_len, output_len")  # fmt: skip
    wl.add_argument("--run", help="which run of a bench request log (default: its only PD run)")
    wl.add_argument("--num-requests", type=int, default=10000)
    wl.add_argument("--rate", type=float, help="Poisson arrivals, requests/s (default: closed loop)")
    wl.add_argument("--concurrency", type=int, help="closed-loop clients (default 2 x max-running x decode)")
    wl.add_argument("--context-scale", type=float, default=1.0, help="multiply prompt lengths")
    wl.add_argument("--seed", type=int, default=0)
    dp = p.add_argument_group("deployment")
    dp.add_argument("--prefill", type=int, default=1)
    dp.add_argument("--decode", type=int, default=1)
    dp.add_argument("--max-running", type=int, default=256, help="per decode instance")
    dp.add_argument("--chunk-budget", type=int, help="chunked_prefill_size (default 8192 GPU, 2048 profile)")
    dp.add_argument("--page-size", type=int, default=16)
    dp.add_argument("--decode-kv-tokens", type=int, help="decode KV pool (default: what HBM holds)")
    dp.add_argument("--prefill-kv-tokens", type=int, help="prefill KV pool (default: what HBM holds)")
    dp.add_argument("--executor-kv-fraction", type=float, default=0.8, help="of prefill KV memory")
    dp.add_argument("--executor-kv-tokens", type=int, help="executor KV pool (default: the fraction)")
    dp.add_argument("--executor-share", type=float, default=0.3, help="executor SM share on the prefill GPU")
    dp.add_argument("--sm-partition", choices=["mps", "green-context"], default="mps",
                    help="executor SM cap: a limit (prefill uses idle SMs) or a partition")  # fmt: skip
    dp.add_argument("--offload", action="store_true", help="simulate PD with attention offloading")
    dp.add_argument("--compare-offload", action="store_true", help="plain PD vs PD + offloading")
    dp.add_argument("--offload-policy", choices=["static", "load-aware"], default="static")
    dp.add_argument("--offload-ratio", type=float, default=0.7, help="static N/M (the paper's best ~0.7)")
    dp.add_argument("--max-offloaded", type=int)
    dp.add_argument("--tpot-slo-ms", type=float)
    dp.add_argument("--ttft-slo-ms", type=float)
    out = p.add_argument_group("output")
    out.add_argument("--recommend", action="store_true", help="search P:D split, ratio and share")
    out.add_argument("--gpus", type=int, help="instances to split for --recommend (default prefill+decode)")
    out.add_argument("--recommend-requests", type=int, default=1000, help="requests per simulation")
    out.add_argument("--plot-dir", help="write PNG plots here")
    out.add_argument("--json", help="write the summaries here")
    return p


def setup_from(args: argparse.Namespace) -> Setup:
    if args.profile:
        prof = load_profile(args.profile)
        model = ModelSpec.load(args.model or "smollm2-135m")
        if not args.decode_kv_tokens:
            raise SystemExit("--profile needs --decode-kv-tokens (a profile holds no memory sizes)")
        host, cores = args.host_ms_per_token, args.prefill_cores
        cost = ProfileCost(prof, model, args.decode_kv_tokens, host_ms_per_token=host, prefill_cores=cores)
        chunk = args.chunk_budget or 2048
    else:
        prof = None
        model = ModelSpec.load(args.model or "llama-2-7b")
        cost = AnalyticCost(model, gpu(args.hardware, args.link), args.tp, Assumptions())
        chunk = args.chunk_budget or 8192
    same = {f.name: getattr(args, f.name) for f in fields(Deployment) if f.name not in DERIVED}
    conc = args.concurrency or 2 * args.max_running * args.decode
    dep = Deployment(**same, chunk_budget=chunk, concurrency=conc)
    slo = Slo(args.tpot_slo_ms, args.ttft_slo_ms)
    return Setup(cost, dep, args.offload_policy, args.offload_ratio, args.max_offloaded, slo, prof)


def run_recommend(args: argparse.Namespace, setup: Setup) -> None:
    gpus = args.gpus or args.prefill + args.decode
    say = lambda c: print(f"  {c.setup.label():55s} goodput {c.rate:7.2f} req/s", file=sys.stderr)
    slo = (args.ttft_slo_ms, args.tpot_slo_ms)
    found = recommend(setup, gpus, args.workload, args.recommend_requests, *slo, progress=say)
    print(table([(f"{c.setup.label()} @ {c.rate:.2f} req/s", c.summary) for c in found[:8] if c.summary]))
    print(f"recommended: {found[0].setup.label()} (goodput {found[0].rate:.2f} req/s)")


def run_simulate(args: argparse.Namespace, setup: Setup) -> None:
    if args.replay and is_run_log(args.replay):
        specs = replay.specs(replay.pick(args.replay, args.run))
    elif args.replay:
        specs = read_log(args.replay)
    else:
        specs = synthetic(args.workload, args.num_requests, args.rate, args.seed, args.context_scale)
    variants = [setup.with_(offload=False), setup.with_(offload=True)] if args.compare_offload else [setup]
    results = []
    for v in variants:
        t = time.perf_counter()
        cluster, summary = v.run(specs)
        took = time.perf_counter() - t
        print(f"{v.label()}: {len(specs)} requests simulated in {took:.1f} s", file=sys.stderr)
        results.append((v.label(), cluster, summary))
    print(table([(label, s) for label, _, s in results]))
    if args.compare_offload:
        print(gain(results[0][2], results[1][2]))
    if args.profile:  # the figures the validation against measured runs compares
        s = results[-1][2]
        print(
            f"predicted: {s.output_tok_s:.1f} output tok/s, TPOT p50 {s.tpot_p50_ms:.1f} ms, "
            f"mean decode batch {s.mean_decode_batch:.1f}"
        )
    if args.plot_dir:
        for path in plot_runs([(label, c) for label, c, _ in results], args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({label: s.as_dict() for label, _, s in results}, f, indent=1)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; a replayed bench run's deployment supplies the defaults of the ones not given."""
    p = parser()
    args = p.parse_args(argv)
    if args.replay and is_run_log(args.replay):
        p.set_defaults(**replay.flag_defaults(replay.pick(args.replay, args.run)))
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup = setup_from(args)
    (run_recommend if args.recommend else run_simulate)(args, setup)
