"""Round trip of the per-layer offload exchange: packed q|k|v out, attention output back.

    python -m adrenaline.bench.exchange --batch-sizes 1 8 32 --context 256

Starts a real attention executor process (default model's shapes, float32 KV) and times, per
layer, ``submit`` + ``wait`` of an ``OffloadClient`` over the chosen transport, against the same
attention computed locally. Prints the median round trip and the local time per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adrenaline.attention import create_backend
from adrenaline.attention.base import AttentionBatch
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig
from adrenaline.models.default_model import resolve_model_path
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.exchange import TransportExchange
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.process import start_executor
from adrenaline.transport import create_transport


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=256, help="KV tokens per request")
    ap.add_argument("--layers", type=int, default=30, help="layers timed per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nccl"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    mc = ModelConfig.from_pretrained(resolve_model_path(None))
    h, hkv, d, ps = mc.num_heads, mc.num_kv_heads, mc.head_dim, 16
    n = max(args.batch_sizes)
    pages = -(-(args.context + args.steps) // ps) * n + 1
    pool = KVPool(mc, pages, ps, torch.float32, args.device)
    backend = "flashinfer" if args.device == "cuda" else "torch"
    _, address = start_executor(pool, h, hkv, backend, (args.transport, "127.0.0.1", None))
    local_pool = KVPool(mc, pages, ps, torch.float32, args.device)
    local = create_backend(backend, local_pool, h, hkv, d)
    transport = create_transport(args.transport, "127.0.0.1", None)
    client = OffloadClient(TransportExchange(transport), timeout_s=30)
    link = ExecutorLink(transport, address, local_pool, pool, ask_timeout_s=30)
    for i in range(n):
        link.reserve(i, args.context, lambda pages: None)
    while link.asks:
        msg = transport.poll(1.0)
        if msg is not None:
            link.handle(msg)
    print(f"transport {args.transport}, device {args.device}, context {args.context}, {args.layers} layers")
    print("| batch | round trip p50 (ms/layer) | local attention (ms/layer) | q/k/v out + out back (KiB) |")
    print("|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        client.prepare([(address, i) for i in range(b)])
        width = -(-(args.context + args.steps) // ps)
        tables = [list(range(i * width, (i + 1) * width)) for i in range(b)]
        trips, locals_ = [], []
        for step in range(args.steps):
            seq = [args.context + step + 1] * b
            slots = torch.tensor([t[(s - 1) // ps] * ps + (s - 1) % ps for t, s in zip(tables, seq)])
            batch = AttentionBatch([1] * b, seq, tables, slots.to(args.device))
            client.begin(batch)
            local.plan(batch)
            for layer in range(args.layers):
                q = torch.randn(b, h, d, device=args.device)
                k, v = torch.randn(b, hkv, d, device=args.device), torch.randn(b, hkv, d, device=args.device)
                tic = time.perf_counter()
                client.submit(layer, q, k, v)
                client.wait(layer)
                trips.append(time.perf_counter() - tic)
                tic = time.perf_counter()
                local.forward(layer, q, k, v)
                locals_.append(time.perf_counter() - tic)
        kib = b * (h + 2 * hkv + h) * d * 4 / 1024
        trip, loc = statistics.median(trips) * 1e3, statistics.median(locals_) * 1e3
        print(f"| {b} | {trip:.3f} | {loc:.3f} | {kib:.1f} |")


if __name__ == "__main__":
    main()
