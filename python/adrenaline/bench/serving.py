"""Serving benchmark: start ``python -m adrenaline.launch_server`` and drive it with SGLang's own
client, ``python -m sglang.benchmark.serving --backend sglang --dataset-name random-ids``.

    python -m adrenaline.bench.serving --num-prompts 32 --input-len 128 --output-len 128 \\
        --max-concurrency 16 -- --dtype bfloat16

Arguments after ``--`` go to the server. Prints one line of figures and, with ``--output``,
appends SGLang's JSON result there. To compare server flags on the same machine state, give each
variant's extra flags with ``--variant=FLAGS`` (repeatable; ``--variant=`` is none) and
``--rounds N``: the variants then run in turn, N times, each on a fresh server, and a last table
gives each variant's median figures (drift in the machine's load hits all variants alike):

    python -m adrenaline.bench.serving --variant= --variant=--enable-deterministic-inference \\
        --rounds 3 -- --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

from adrenaline.bench.cpu_use import per_token_ms, snapshot
from adrenaline.bench.request_log import internal_state, log_run
from adrenaline.models.default_model import resolve_model_path
from adrenaline.procs import free_port, spawn


@contextmanager
def server(extra: list[str], port: int, timeout: float = 300):
    """A launch_server subprocess, up (``/health`` answers) inside the block, stopped after it."""
    cmd = [
        sys.executable,
        "-m",
        "adrenaline.launch_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    proc = spawn(cmd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during startup")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not come up") from None
                time.sleep(1)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_client(
    port: int, tokenizer: str, args: argparse.Namespace, start: tuple[str, float] | None = None
) -> dict:
    """SGLang's figures, plus ``requests``: each request's send, first-token and finish times
    (seconds from the first send) and lengths, for the request log (``bench.request_log``), and
    ``cpu_ms_per_token``: each serving process role's CPU per output token over the run, the
    client's own included (``bench.cpu_use``; the roles of every deployment up on the machine).
    ``start``: (start file, delay) for clients started together (``bench.client``)."""
    cpu_before = snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.jsonl")
        records = os.path.join(tmp, "requests.jsonl")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "adrenaline.bench.client",
                records,
                "--backend",
                "sglang",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dataset-name",
                "random-ids",
                "--tokenizer",
                tokenizer,
                "--num-prompts",
                str(args.num_prompts),
                "--random-input-len",
                str(args.input_len),
                "--random-output-len",
                str(args.output_len),
                "--random-range-ratio",
                "1",
                "--max-concurrency",
                str(args.max_concurrency),
                "--output-file",
                out,
                "--output-details",
                *(("--start-file", start[0], "--delay", str(start[1])) if start else ()),
            ],
            check=True,
        )
        with open(out) as f:
            result = json.loads(f.read().splitlines()[-1])
        with open(records) as f:
            *sent, client = [json.loads(line) for line in f]
    before = {**cpu_before, "client": 0.0}
    after = {**snapshot(), "client": client["client_cpu_s"]}  # its own, from its first request
    result["cpu_ms_per_token"] = per_token_ms(before, after, result["total_output_tokens"])
    t0 = min((r["start_time"] for r in sent), default=0.0)
    result["requests"] = [
        {
            "sent": r["start_time"] - t0,
            "input_len": r["prompt_len"],
            "output_len": r["output_len"],
            "ttft": r["ttft"],
            "finish": r["start_time"] - t0 + r["latency"],
        }
        for r in sent
        if r["success"]
    ]
    # The longest silence any stream saw between two chunks: what a stalled step costs a user.
    result["max_itl_ms"] = max((g for itl in result.pop("itls", []) for g in itl), default=0.0) * 1000
    for key in ("input_lens", "output_lens", "ttfts", "generated_texts", "errors"):
        result.pop(key, None)
    return result


FIELDS = [
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "max_itl_ms",
]


def parse_args(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags (and the shared ``--request-log``), and the server flags after ``--``."""
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap.add_argument("--request-log", default=None, help="append each run's request log here (JSONL)")
    return ap.parse_args(argv[:cut]), argv[cut + 1 :]


def run_once(server_args: list[str], model: str, args: argparse.Namespace, label: str) -> dict:
    """One fresh server with ``server_args``, driven once; its figures (``--output`` gets them)."""
    port = free_port()
    with server(server_args, port):
        before = internal_state(port)["stats"]
        result = run_client(port, model, args)
        log_run(args, label, result, before, internal_state(port)["stats"], port)
    result.pop("requests")
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps({**result, "run": label}) + "\n")
    print(f"{label}: " + " | ".join(f"{k} {result[k]:.2f}" for k in FIELDS if k in result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--output", default=None, help="append SGLang's JSON result to this file")
    ap.add_argument(
        "--variant",
        action="append",
        metavar="FLAGS",
        help="server flags added for one variant (repeatable; write --variant=FLAGS)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="how often each variant runs, interleaved")
    args, server_args = parse_args(ap)
    model = resolve_model_path(None)
    if "--model-path" in server_args:
        model = server_args[server_args.index("--model-path") + 1]
    variants = args.variant or [""]
    print(
        f"server args: {' '.join(server_args) or '(defaults)'}; {args.num_prompts} prompts, "
        f"in {args.input_len} / out {args.output_len}, concurrency {args.max_concurrency}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            label = f"single{' ' + v if v else ''}" + (f" (round {r + 1})" if args.rounds > 1 else "")
            runs[v].append(run_once(server_args + shlex.split(v), model, args, label))
    if len(variants) > 1 or args.rounds > 1:
        keys = [k for k in FIELDS if k in runs[variants[0]][0]]
        print(f"\nmedians over {args.rounds} round(s)\n| variant | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for v, results in runs.items():
            medians = [statistics.median(res[k] for res in results) for k in keys]
            print(f"| {v or '(none)'} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
