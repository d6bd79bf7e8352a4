"""Round trip of the per-layer offload exchange: q|k|v out, attention output back.

    python -m adrenaline.bench.exchange --batch-sizes 1 8 32 --context 256 --exchange tcp shm

Starts a real attention executor process (default model's shapes, float32 KV) and times, per
layer, ``submit`` + ``wait`` of an ``OffloadClient`` through each exchange (``tcp``: ZeroMQ,
``shm``: the same-host shared-memory channel), against the same attention computed locally. The
executor reports its own attention time with each output, so the round trip less that is the
transport's overhead (both sides' packing, copies, doorbells or sockets, wake-ups); the table
reports the medians per exchange and batch size, and the same attention timed here for reference.
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
from adrenaline.offload.exchange import AttentionExchange, TransportExchange
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.process import start_executor
from adrenaline.offload.shm import ShmExchange
from adrenaline.transport import Transport, create_transport
from adrenaline.transport.shm_segment import ShmLayout

PAGE = 16


class ExecutorRig:
    """A real attention executor process with ``rows`` requests' rooms reserved (room i for row i),
    and a local pool of the same size: what the exchange and step benchmarks run against."""

    def __init__(
        self, mc: ModelConfig, rows: int, tokens: int, dtype: torch.dtype, device: str, transport: str = "tcp"
    ) -> None:
        h, hkv = mc.num_heads, mc.num_kv_heads
        pages = -(-tokens // PAGE) * rows + 1
        pool = KVPool(mc, pages, PAGE, dtype, device)
        self.backend = "flashinfer" if device == "cuda" else "torch"
        self.process, self.address = start_executor(
            pool, h, hkv, self.backend, (transport, "127.0.0.1", None)
        )
        self.local_pool = KVPool(mc, pages, PAGE, dtype, device)
        self.transport = create_transport(transport, "127.0.0.1", None)
        link = ExecutorLink(self.transport, self.address, self.local_pool, pool, ask_timeout_s=30)
        for i in range(rows):
            link.reserve(i, tokens, lambda pages: None)
        while link.asks:
            msg = self.transport.poll(1.0)
            if msg is not None:
                link.handle(msg)


def decode_batch(b: int, seq: int, width: int, device: str = "cpu") -> AttentionBatch:
    """``b`` decodes of ``seq`` KV tokens each; row i owns pages [i * width, (i + 1) * width)."""
    tables = [list(range(i * width, (i + 1) * width)) for i in range(b)]
    slots = torch.tensor([t[(seq - 1) // PAGE] * PAGE + (seq - 1) % PAGE for t in tables], device=device)
    return AttentionBatch([1] * b, [seq] * b, tables, slots)


def make_exchange(kind: str, transport: Transport, layout: ShmLayout) -> AttentionExchange:
    if kind == "tcp":
        return TransportExchange(transport)
    return ShmExchange(transport, layout, timeout_s=30, mode="shm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=256, help="KV tokens per request")
    ap.add_argument("--layers", type=int, default=30, help="layers timed per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nccl"])
    ap.add_argument("--exchange", nargs="+", default=["tcp", "shm"], choices=["tcp", "shm"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the executor: the local attention is timed on the same footing
    mc = ModelConfig.from_pretrained(resolve_model_path(None))
    h, hkv, d = mc.num_heads, mc.num_kv_heads, mc.head_dim
    n = max(args.batch_sizes)
    rig = ExecutorRig(mc, n, args.context + args.steps, torch.float32, args.device, args.transport)
    address, transport = rig.address, rig.transport
    local = create_backend(rig.backend, rig.local_pool, h, hkv, d)
    print(f"transport {args.transport}, device {args.device}, context {args.context}, {args.layers} layers")
    print(
        "| exchange | batch | round trip p50 (ms/layer) | executor attention p50 (ms/layer) "
        "| transport overhead p50 (us/layer) | same attention here p50 (ms/layer) "
        "| q/k/v out + out back (KiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    layout = ShmLayout(n, h, hkv, d, torch.float32)
    for kind in args.exchange:
        exchange = make_exchange(kind, transport, layout)
        client = OffloadClient(exchange, timeout_s=30)
        for b in args.batch_sizes:
            trip, executor, overhead, loc = time_layers(client, local, address, b, args, (h, hkv, d))
            kib = b * (h + 2 * hkv + h) * d * 4 / 1024
            print(
                f"| {kind} | {b} | {trip * 1e3:.3f} | {executor * 1e3:.3f} | {overhead * 1e6:.0f} "
                f"| {loc * 1e3:.3f} | {kib:.1f} |"
            )
        exchange.close()


def time_layers(
    client: OffloadClient, local, address: str, b: int, args, heads
) -> tuple[float, float, float, float]:
    """Median seconds per layer: the exchange's round trip, the executor's attention time (as it
    reports it with each output), the round trip less that (the transport's own cost), and the same
    attention computed here."""
    h, hkv, d = heads
    client.prepare([(address, i) for i in range(b)])
    width = -(-(args.context + args.steps) // PAGE)
    trips, executor, overhead, locals_ = [], [], [], []
    for step in range(args.steps):
        batch = decode_batch(b, args.context + step + 1, width, args.device)
        client.begin(batch)
        local.plan(batch)
        for layer in range(args.layers):
            q = torch.randn(b, h, d, device=args.device)
            k, v = torch.randn(b, hkv, d, device=args.device), torch.randn(b, hkv, d, device=args.device)
            tic = time.perf_counter()
            client.submit(layer, q, k, v)
            client.wait(layer)
            trips.append(time.perf_counter() - tic)
            executor.append(client.exchange.executor_s)
            overhead.append(trips[-1] - executor[-1])
            tic = time.perf_counter()
            local.forward(layer, q, k, v)
            locals_.append(time.perf_counter() - tic)
    return tuple(statistics.median(x) for x in (trips, executor, overhead, locals_))


if __name__ == "__main__":
    main()
