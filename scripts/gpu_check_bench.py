"""The GPU check's measurements (``gpu_check.py``): per-layer exchange latency, the offloaded decode
step against all-local under CUDA graphs, and the decode kernel's HBM bandwidth.

On GPU the offloaded group goes through the flag-synchronised CUDA-IPC exchange to an
``IpcAttentionServer`` graph on a second stream of this process (a second process under MPS maps
the same buffers); on CPU through a ``LoopbackExchange`` (no peer), so only the code path is
checked there. Both sides share the one GPU here: the step overhead is the colocated figure, not
the two-GPU design's.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.triton_backend import DecodePlan, TritonAttentionBackend
from adrenaline.kv_cache.pool import KVPool
from adrenaline.runner.cuda_graph import DecodeGraphs, GraphExchange, LoopbackExchange, bucket_for

PS = 16
HEADS = (9, 3, 64)  # the default model's query heads, KV heads, head dim
TARGETS = {"exchange_us": 20.0, "step_ratio": 1.1, "bandwidth_pct": 70.0}


def timed(fn, gpu: bool, before=None) -> float:
    """Median seconds of ``fn`` (device time on GPU); ``before`` runs untimed ahead of each call.
    On CPU (the interpreter, tiny shapes) two calls: only the code path counts there."""
    iters, warmup = (20, 3) if gpu else (2, 0)
    samples = []
    for _ in range(warmup + iters):
        if before is not None:
            before()
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            tic = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - tic)
    return statistics.median(samples[warmup:])


def graphed(fn, gpu: bool, exchange: GraphExchange | None = None, rows: int = 0):
    """``fn`` captured as a CUDA graph (warmed up first); on CPU ``fn`` itself."""
    if not gpu:
        return fn
    if exchange is not None:
        exchange.idle(rows)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_exchange(remote: TritonAttentionBackend, rows: int, num_layers: int, max_seq_len: int, gpu: bool):
    if not gpu:
        return LoopbackExchange(remote, max_seq_len)
    from adrenaline.runner.ipc_exchange import CudaIpcExchange, ExchangeBuffers, IpcAttentionServer

    heads = (remote.num_heads, remote.num_kv_heads, remote.head_dim)
    buffers = ExchangeBuffers.create(rows, heads, remote.pool.dtype, remote.pool.device)
    server = IpcAttentionServer(remote, buffers, num_layers)
    width = -(-max_seq_len // PS)
    return CudaIpcExchange(buffers, num_layers, lambda batch, n: server.step(batch, n, width))


def decode_batch(b: int, seq_len: int, device, first_page: int = 0) -> AttentionBatch:
    """``b`` requests of ``seq_len`` tokens on consecutive pages; the last token is the new one."""
    n = -(-seq_len // PS)
    tables = [list(range(first_page + i * n, first_page + (i + 1) * n)) for i in range(b)]
    slots = torch.tensor([t[(seq_len - 1) // PS] * PS + (seq_len - 1) % PS for t in tables], device=device)
    return AttentionBatch([1] * b, [seq_len] * b, tables, slots)


def layer_times(b: int, c: int, layers: int, dtype: torch.dtype, device: torch.device, gpu: bool) -> dict:
    """Per layer, for ``b`` requests of ``c`` tokens: local attention, and the same attention
    behind the exchange; the difference is the exchange's round trip (copy in, flag, flag, read)."""
    h, hkv, d = HEADS
    cfg = SimpleNamespace(num_kv_heads=hkv, head_dim=d, num_layers=layers)
    pools = [KVPool(cfg, b * -(-c // PS) + 1, PS, dtype, device) for _ in range(2)]
    local, remote = (TritonAttentionBackend(p, h, hkv, d) for p in pools)
    batch = decode_batch(b, c, device)
    plan = DecodePlan.build(batch, PS, local.num_splits(b, c)).to(device)
    q, k, v = (torch.randn(b, n, d, dtype=dtype, device=device) for n in (h, hkv, hkv))
    exchange = make_exchange(remote, b, layers, c, gpu)

    def local_layers():
        for layer in range(layers):
            local.forward_decode(layer, q, k, v, plan)

    def offloaded_layers():
        for layer in range(layers):
            exchange.submit(layer, q, k, v)
            exchange.wait(layer)

    def begin():
        exchange.begin(batch, b)

    t_local = timed(graphed(local_layers, gpu), gpu)
    t_off = timed(graphed(offloaded_layers, gpu, exchange, b), gpu, before=begin)
    return {
        "batch": b,
        "context": c,
        "local_attention_us": round(t_local / layers * 1e6, 2),
        "offloaded_layer_us": round(t_off / layers * 1e6, 2),
        "exchange_us": round((t_off - t_local) / layers * 1e6, 2),
    }


def exchange_latency(device: torch.device, gpu: bool) -> dict:
    layers = 30 if gpu else 2
    dtype = torch.bfloat16 if gpu else torch.float32
    cases = [(1, 256), (16, 2048), (64, 2048)] if gpu else [(1, 16), (2, 40)]
    rows = [layer_times(b, c, layers, dtype, device, gpu) for b, c in cases]
    worst = max(r["exchange_us"] for r in rows)
    return {
        "status": "ok",
        "exchange": "CUDA IPC buffers + flag waits, two streams" if gpu else "loopback (CPU: no peer)",
        "nccl": "skipped: NCCL needs two GPUs (two ranks cannot share one device)",
        "worst_exchange_us": worst,
        "target_us": TARGETS["exchange_us"],
        "meets_target": worst <= TARGETS["exchange_us"],
        "rows": rows,
    }


def step_overhead(path: str, device: torch.device, gpu: bool) -> dict:
    """One decode step of the model: all-local vs an offload ratio N/M = 0.7, same total batch,
    both as CUDA graphs (and all-local eager for the graphs' own gain)."""
    from adrenaline import Engine

    b, c, ratio = (64, 2048, 0.7) if gpu else (4, 40, 1.0)
    e = Engine(
        path, device=str(device), dtype="bfloat16" if gpu else "float32", attention_backend="triton",
        max_total_tokens=b * (c + PS) + PS, skip_tokenizer_init=True, cuda_graph=False,
    )  # fmt: skip
    r, mc = e.runner, e.runner.model_config
    n_remote = round(b * ratio / (1 + ratio))
    n_local = b - n_remote
    batch = decode_batch(b, c + 1, device)
    ids = torch.randint(2, mc.vocab_size, (b,), device=device)
    pos = torch.full((b,), c, device=device)
    times = {}
    for name, capture in (("all_local_eager", False), ("all_local_graph", gpu)):
        graphs = DecodeGraphs(r, b, None, capture=capture)
        graphs.run(ids, pos, batch, b)
        times[name] = timed(graphs.graphs[graphs.cell(b, 0)].replay, gpu)
    remote_pool = KVPool(mc, r.pool.num_pages, PS, r.dtype, device)
    remote = TritonAttentionBackend(remote_pool, mc.num_heads, mc.num_kv_heads, mc.head_dim)
    graphs = DecodeGraphs(r, b, None, capture=gpu)
    cell = (bucket_for(n_local, graphs.buckets), bucket_for(n_remote, graphs.buckets))
    graphs.exchange = make_exchange(remote, cell[1], mc.num_layers, graphs.max_seq_len, gpu)
    graphs.run(ids, pos, batch, n_local)
    remote_batch = batch.select(list(range(n_local, b)), n_local)
    g = graphs.graphs[cell]
    times["offloaded_graph"] = timed(
        g.replay, gpu, before=lambda: graphs.exchange.begin(remote_batch, cell[1])
    )
    step_ratio = times["offloaded_graph"] / times["all_local_graph"]
    return {
        "status": "ok",
        "batch": b,
        "context": c,
        "local_offloaded": [n_local, n_remote],
        "cell": list(cell),
        **{f"{k}_ms": round(v * 1e3, 3) for k, v in times.items()},
        "offloaded_vs_local": round(step_ratio, 3),
        "graph_speedup": round(times["all_local_eager"] / times["all_local_graph"], 2),
        "target_ratio": TARGETS["step_ratio"],
        "meets_target": step_ratio <= TARGETS["step_ratio"],
    }


def bandwidth_rows(name, b, c, heads, dtype, device, gpu, peak) -> list[dict]:
    """One row per number of splits (the automatic choice among them)."""
    from sgl_kernel_ext import triton_decode

    h, hkv, d = heads
    pages = b * c // PS
    k, v = (torch.randn(pages, PS, hkv, d, dtype=dtype, device=device) for _ in range(2))
    q = torch.randn(b, h, d, dtype=dtype, device=device)
    idx = torch.randperm(pages, device=device).view(b, c // PS).int()
    lens = torch.full((b,), c, dtype=torch.int32, device=device)
    out = torch.empty(b, h, d, dtype=torch.float32, device=device)
    nbytes = 2 * k.numel() * k.element_size() + q.numel() * q.element_size() + out.numel() * 4
    auto = triton_decode.choose_num_splits(b, hkv, c)
    rows = []
    for splits in sorted({auto, 1, 2, 4, 8, 16} if gpu else {auto, 2}):
        t = timed(
            lambda s=splits: triton_decode.paged_decode_attention(q, k, v, idx, lens, d**-0.5, s, out), gpu
        )
        gbps = nbytes / t / 1e9
        rows.append(
            {
                "case": name,
                "batch": b,
                "context": c,
                "num_splits": f"{splits}{' (auto)' if splits == auto else ''}",
                "us": round(t * 1e6, 1),
                "GB_per_s": round(gbps, 1),
                "pct_of_peak": round(100 * gbps * 1e9 / peak, 1) if peak else None,
            }
        )
    return rows


def decode_bandwidth(device: torch.device, gpu: bool, peak: float | None) -> dict:
    """Achieved HBM bandwidth of the Triton decode kernel (K/V bytes read per call / time)."""
    b, c = (64, 2048) if gpu else (2, 48)
    cases = (
        [("smollm2 9q/3kv x64", 9, 3, 64), ("llama3-8b 32q/8kv x128", 32, 8, 128)]
        if gpu
        else [("tiny", 4, 2, 16)]
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for name, h, hkv, d in cases:
        rows += bandwidth_rows(name, b, c, (h, hkv, d), dtype, device, gpu, peak)
    best = max((r["pct_of_peak"] or 0) for r in rows)
    return {
        "status": "ok",
        "peak_GB_per_s": round(peak / 1e9) if peak else None,
        "best_pct_of_peak": best,
        "target_pct": TARGETS["bandwidth_pct"],
        "meets_target": best >= TARGETS["bandwidth_pct"],
        "rows": rows,
    }
