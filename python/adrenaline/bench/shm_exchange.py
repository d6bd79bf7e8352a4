"""Transport overhead of the per-layer exchange: shared memory against today's ZeroMQ path.

    python -m adrenaline.bench.shm_exchange --batch-sizes 1 8 32 --iters 3000

One executor process serves both paths with a no-op attention (it answers a preallocated output
of the right shape), so a round trip is pure transport overhead: packing q|k|v, the doorbell or
message, the executor's wake-up and copy, the answer. Steps of ``--layers`` layers alternate
between the two paths, so both see the same machine load. ``--gap-us`` keeps the decode side busy
between layers, as its dense layers would: past the doorbell's spin (30 us) the executor sleeps,
and each layer then pays its wake-up, as in a real decode step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.multiprocessing as mp

from adrenaline.attention.base import AttentionBatch
from adrenaline.core.request import Req
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.protocol import ATTN_OUT, ATTN_QKV
from adrenaline.transport import ZmqTransport
from adrenaline.transport.doorbell import SPIN_S
from adrenaline.transport.shm_exchange import ShmClientChannel
from adrenaline.transport.shm_segment import ShmLayout
from adrenaline.transport.shm_server import ShmServer


def _executor(offer: dict, heads: tuple[int, int, int], max_rows: int, spin_s: float, conn) -> None:
    torch.set_num_threads(1)
    h, _, d = heads
    out = torch.zeros(max_rows, h, d)
    shm = ShmServer(lambda meta, layer, q, k, v: out[: q.shape[0]], spin_s=spin_s)
    shm.add("bench", offer, heads)
    zmq = ZmqTransport()
    conn.send(zmq.address)
    while not conn.poll(0):
        msg = zmq.poll(0.1)
        if msg is not None and msg.kind == ATTN_QKV:
            rows = msg.tensors[0].shape[0]
            zmq.send(msg.peer, ATTN_OUT, {"step": msg.meta["step"], "layer": msg.meta["layer"]}, [out[:rows]])
    shm.close()
    zmq.close()


def _zmq_client(address: str, batch: int) -> OffloadClient:
    client = OffloadClient(ZmqTransport(), timeout_s=30)
    reqs = []
    for i in range(batch):
        req = Req(str(i), [0], None)  # type: ignore[arg-type]
        req.offload, req.extra["bootstrap"] = address, ("", 0, i)
        reqs.append(req)
    client.prepare(reqs)
    client.begin(AttentionBatch([1] * batch, [2] * batch, [[]] * batch, torch.zeros(batch, dtype=torch.long)))
    return client


def _busy(seconds: float) -> None:
    """Keep the core busy, as the decode's dense layers would between two exchanges."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], help="H Hkv D (default: SmolLM2-135M)")
    ap.add_argument("--iters", type=int, default=3000, help="layers timed per path and batch size")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--gap-us", type=float, default=0.0, help="decode-side busy time between layers")
    ap.add_argument("--executor-spin-us", type=float, default=SPIN_S * 1e6, help="see ShmServer's spin_s")
    args = ap.parse_args()
    torch.set_num_threads(1)
    heads, n = tuple(args.heads), max(args.batch_sizes)
    h, hkv, d = heads
    channel = ShmClientChannel.create(ShmLayout(n, h, hkv, d), timeout_s=30)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=_executor, args=(channel.offer(), heads, n, args.executor_spin_us * 1e-6, child), daemon=True
    )
    proc.start()
    channel.wait_attached(120)
    address = conn.recv()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(f"{cpu}; heads {heads}, float32, {args.iters} layers a path, {args.gap_us:.0f} us between layers")
    print("| batch | shm p50 (us) | shm p99 (us) | zmq p50 (us) | zmq p99 (us) |")
    print("|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        zmq = _zmq_client(address, b)
        channel.begin(1, list(range(b)), [2] * b)
        times: dict[str, list[float]] = {"shm": [], "zmq": []}
        inputs = [(torch.randn(b, h, d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)) for _ in range(4)]
        for step in range(-(-args.iters // args.layers) + 1):  # step 0 warms up
            for name, path in (("shm", channel), ("zmq", zmq)):
                for layer in range(args.layers):
                    _busy(args.gap_us * 1e-6)
                    tic = time.perf_counter()
                    path.submit(layer, *inputs[layer % 4])
                    path.wait(layer)
                    if step:
                        times[name].append(time.perf_counter() - tic)
        zmq.transport.close()
        s, z = times["shm"], times["zmq"]
        print(
            f"| {b} | {_pct(s, 0.5):.1f} | {_pct(s, 0.99):.1f} | {_pct(z, 0.5):.1f} | {_pct(z, 0.99):.1f} |"
        )
    conn.send("stop")
    proc.join(30)
    channel.close()


if __name__ == "__main__":
    main()
