"""One decode step with N of B requests offloaded, against the same step with all B local.

    python -m adrenaline.bench.step --batch-sizes 8 16 --offloaded 0.25 0.5 --context 256 --dtype bfloat16

The whole model's decode step (the server's forward: projections, MLPs, logits) runs here on one
core with the local group's attention, while a real attention executor process, pinned to another
core, computes the offloaded group's attention through the shared-memory exchange (``--exchange
tcp`` for ZeroMQ). The configurations of one batch size run interleaved, step by step, so a noisy
neighbour slows them alike. It prints the median step time of each, its ratio to the all-local
step (issue 12's target: an offloaded step within 1.1x), and where the offloaded steps' time went
(``StepTimes``: dense, local attention, waiting on the executor, exchange; and the executor's own
attention time, which runs alongside).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from adrenaline.attention import create_backend
from adrenaline.attention.split import SplitAttention
from adrenaline.bench.exchange import PAGE, ExecutorRig, decode_batch, make_exchange
from adrenaline.model_config import ModelConfig, resolve_dtype
from adrenaline.models.default_model import resolve_model_path
from adrenaline.models.loader import load_model
from adrenaline.offload.client import OffloadClient, StepTimes
from adrenaline.transport.shm_segment import ShmLayout


def pin(pid: int, core: int) -> None:
    """Best effort: where the machine has that core."""
    if hasattr(os, "sched_setaffinity") and core in os.sched_getaffinity(0):
        os.sched_setaffinity(pid, {core})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--offloaded", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fractions of B")
    ap.add_argument("--context", type=int, default=256, help="KV tokens per request")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--exchange", default="shm", choices=["shm", "tcp"])
    args = ap.parse_args()

    torch.set_num_threads(1)  # as a decode instance on one core
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    path = resolve_model_path(None)
    mc = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(args.dtype, None)
    model = load_model(path, mc, dtype, "cpu", show_progress=False)
    n = max(args.batch_sizes)
    rig = ExecutorRig(mc, n, args.context + args.steps + 1, dtype, "cpu")
    pin(rig.process.pid, cores[0])
    pin(0, cores[-1])
    h, hkv, d = mc.num_heads, mc.num_kv_heads, mc.head_dim
    local = create_backend(rig.backend, rig.local_pool, h, hkv, d)
    exchange = make_exchange(args.exchange, rig.transport, ShmLayout(n, h, hkv, d, dtype))
    client = OffloadClient(exchange, timeout_s=30)
    width = -(-(args.context + args.steps + 1) // PAGE)
    print(
        f"{os.cpu_count()} cores, decode on core {cores[-1]}, executor on core {cores[0]}; {args.dtype}, "
        f"context {args.context}, {args.exchange} exchange, median of {args.steps} steps"
    )
    print(
        "| batch | offloaded | step p50 (ms) | vs all local | dense | local attn | executor wait | exchange "
        "| executor's attention |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for b in args.batch_sizes:
            counts = sorted({0, *(round(f * b) for f in args.offloaded)})
            times: dict[int, list[float]] = {c: [] for c in counts}
            parts: dict[int, list[StepTimes]] = {c: [] for c in counts}
            ids = torch.zeros(b, dtype=torch.long)
            for step in range(args.steps + 1):  # the first round warms up
                seq = args.context + step + 1
                pos = torch.full((b,), seq - 1, dtype=torch.long)
                for c in counts:
                    batch = decode_batch(b, seq, width)
                    remote = client.prepare([(rig.address, i) for i in range(c)]) if c else None
                    tic = time.perf_counter()
                    model(ids, pos, SplitAttention(local, batch, b - c, remote), torch.arange(b))
                    elapsed = time.perf_counter() - tic
                    measured = client.end_step() if c else None
                    if step:
                        times[c].append(elapsed)
                        if measured is not None:
                            parts[c].append(measured)
            base = statistics.median(times[0])
            for c in counts:
                p50 = statistics.median(times[c])
                split = " | ".join(
                    f"{statistics.median(getattr(t, f) for t in parts[c]) * 1e3:.1f}" if c else "-"
                    for f in (
                        "dense_s",
                        "local_attention_s",
                        "executor_wait_s",
                        "exchange_s",
                        "executor_attention_s",
                    )
                )
                print(f"| {b} | {c} | {p50 * 1e3:.1f} | {p50 / base:.2f}x | {split} |")
    exchange.close()
    rig.process.kill()


if __name__ == "__main__":
    main()
