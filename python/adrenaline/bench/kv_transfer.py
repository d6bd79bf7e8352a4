"""KV transfer time per request: today's PD path (ZeroMQ/TCP) against one-sided Mooncake writes.

    python -m adrenaline.bench.kv_transfer --tokens 1024 8192 --reps 10
    python -m adrenaline.bench.kv_transfer --tokens 64 --reps 2 --layers 2   # a quick check

Two KV pools in the default model's layout (30 layers, 3 KV heads, head dim 64, bf16, 16-token
pages), without the servers. Per request, the prompt's pages go from one pool into scattered pages
of the other, as the PD planes move them:

- ``zmq``: what ``disaggregation/`` does over ``--pd-transport tcp``: ``TransportPages`` gathers the
  pages into one tensor and sends a ``KVPages`` message over ``ZmqTransport``; ``scatter_pages`` on arrival;
- ``mooncake``: ``MooncakeKVPlane.write_pages`` (runs of pages coalesced, batched writes, a
  completion notice with the room), timed until the receiver sees the room.

The receiving pages are ``scattered`` (a churned decode pool's free list) or ``contiguous`` (a
fresh one): Mooncake writes each contiguous run of pages per layer and K/V as one entry, so the
layout sets how many entries a request costs, and over TCP each entry pays a fixed overhead.

Both ends live in this process (each plane moves the bytes on its own threads). The paths are
interleaved per repetition, after one uncounted warm-up round, so drift in the machine's load
hits both alike. Prints median and mean milliseconds per request and the effective GB/s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from adrenaline.disaggregation.kv_move import TransportPages
from adrenaline.disaggregation.protocol import PD, KVPages
from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.kv_pages import scatter_pages
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_kv import MooncakeKVPlane
from adrenaline.transport.zmq_transport import ZmqTransport

Transfer = Callable[[list[int], list[int], int], None]  # (src pages, dst pages, room)


def make_pool(args: argparse.Namespace, pages: int, fill: bool) -> KVPool:
    shape = (pages, args.page_size, args.kv_heads, args.head_dim)
    dtype = getattr(torch, args.dtype)

    def tensor() -> torch.Tensor:
        return torch.randn(shape).to(dtype) if fill else torch.zeros(shape, dtype=dtype)

    return KVPool.from_tensors([tensor() for _ in range(args.layers)], [tensor() for _ in range(args.layers)])


def zmq_path(src: KVPool, dst: KVPool) -> Transfer:
    sender, receiver = ZmqTransport(), ZmqTransport()
    mover = TransportPages(src, sender)

    def is_room(msg, room: int) -> bool:
        parsed = PD.parse(msg)
        return isinstance(parsed, KVPages) and parsed.room == room

    def transfer(src_pages: list[int], dst_pages: list[int], room: int) -> None:
        mover.move(receiver.address, room, 0, src_pages, dst_pages)
        msg = receiver.recv(lambda m: is_room(m, room), timeout_s=60)
        scatter_pages(dst, dst_pages, msg.tensors[0])

    return transfer


def mooncake_path(src: KVPool, dst: KVPool, protocol: str, device: str) -> Transfer:
    sender = MooncakeKVPlane(src, MooncakeEngine("127.0.0.1", protocol, device, timeout_s=60))
    receiver = MooncakeKVPlane(dst, MooncakeEngine("127.0.0.1", protocol, device, timeout_s=60))
    session = sender.connect(receiver.descriptor())

    def transfer(src_pages: list[int], dst_pages: list[int], room: int) -> None:
        sender.write_pages(session, src_pages, dst_pages, notice=(room, len(dst_pages)))
        while room not in [r for r, _ in receiver.landed()]:
            time.sleep(0.0001)

    return transfer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192], help="prompt lengths")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--protocol", default="tcp", help="Mooncake protocol: tcp, rdma, nvlink")
    ap.add_argument("--mooncake-device", default="", help="RDMA device(s), e.g. mlx5_0")
    layouts = ["scattered", "contiguous"]
    ap.add_argument("--dst", nargs="+", default=layouts, choices=layouts, help="receiving pages")
    args = ap.parse_args()

    need = max(-(-t // args.page_size) for t in args.tokens)
    src, dst = make_pool(args, need, fill=True), make_pool(args, need, fill=False)
    paths = {
        "zmq": zmq_path(src, dst),
        "mooncake": mooncake_path(src, dst, args.protocol, args.mooncake_device),
    }
    cases = [(p, t, d) for t in args.tokens for d in args.dst for p in paths]
    times: dict[tuple[str, int, str], list[float]] = {c: [] for c in cases}
    rng = random.Random(0)
    room = 0
    for rep in range(args.reps + 1):  # the first round connects and warms up: not counted
        for tokens in args.tokens:
            n = -(-tokens // args.page_size)
            for layout in args.dst:
                fresh = list(range(need - n, need))  # a fresh pool hands out a run
                dst_pages = rng.sample(range(need), n) if layout == "scattered" else fresh
                for name, transfer in paths.items():
                    room += 1
                    start = time.perf_counter()
                    transfer(list(range(n)), dst_pages, room)
                    if rep:
                        times[name, tokens, layout].append(time.perf_counter() - start)
                for a, b in zip(src.k + src.v, dst.k + dst.v):  # both paths must deliver the pages
                    assert torch.equal(b[dst_pages].view(torch.uint8), a[:n].view(torch.uint8)), name
                    b.zero_()

    page_bytes = src.k[0][0].numel() * src.k[0].element_size() * 2 * args.layers
    print(f"KV layout: {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} dim, {args.dtype}")
    head = ("tokens", "dst pages", "path", "MB", "median ms", "mean ms", "GB/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (7, 10, 9, 8, 10, 9, 6))))
    for name, tokens, layout in cases:
        ts = times[name, tokens, layout]
        mb = -(-tokens // args.page_size) * page_bytes / 1e6
        med, mean = statistics.median(ts) * 1e3, statistics.mean(ts) * 1e3
        print(f"{tokens:>7} {layout:>10} {name:>9} {mb:>8.1f} {med:>10.2f} {mean:>9.2f} {mb / med:>6.2f}")


if __name__ == "__main__":
    main()
