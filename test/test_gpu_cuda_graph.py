"""Decode CUDA graphs: bucket choice and padding (CPU), the padded static path giving the same
tokens as the plain one (CPU: eager, Triton's interpreter; GPU: captured graphs replayed), and the
2-D (local, offloaded) grid with the offloaded group behind an exchange."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from adrenaline import Engine
from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.triton_backend import TritonAttentionBackend
from adrenaline.kv_cache.pool import KVPool
from adrenaline.runner.cuda_graph import (
    DecodeGraphs,
    LoopbackExchange,
    bucket_for,
    buckets_up_to,
    padded_rows,
)
from sgl_kernel_ext.triton_ops import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and triton was imported before interpret_on_cpu", allow_module_level=True)
PARAMS = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


def test_buckets_and_padding():
    assert buckets_up_to(20) == [1, 2, 4, 8, 12, 16, 24]
    assert buckets_up_to(300)[-2:] == [256, 300]
    b = buckets_up_to(64)
    assert [bucket_for(n, b) for n in (0, 1, 3, 12, 13, 64, 65)] == [0, 1, 4, 12, 16, 64, None]
    assert padded_rows(2, 3, 4).tolist() == [0, 1, 4, 5, 6]


def test_grid_cells(tiny_model_factory):
    runner = engine(tiny_model_factory("llama"), cuda_graph=False).runner
    graphs = DecodeGraphs(runner, 16, exchange=None, capture=False)
    assert graphs.cell(3, 0) == (4, 0) and graphs.cell(3, 2) is None  # offloaded rows need an exchange
    graphs.exchange = object()
    assert graphs.cell(0, 9) == (0, 12) and graphs.cell(5, 9) == (8, 12) and graphs.cell(17, 0) is None


def engine(path: str, **kw) -> Engine:
    kw = {"dtype": "float32", **kw}
    return Engine(
        path, device=DEVICE, attention_backend="triton", max_total_tokens=512, skip_tokenizer_init=True, **kw
    )


def test_triton_padded_decode_path_equals_plain(tiny_model_factory):
    """Plain decode through DecodeGraphs (eager on CPU) gives the plain path's tokens."""
    path = tiny_model_factory("llama")
    prompts = random_prompts(3, 512, [5, 19, 33], seed=5)
    want = engine(path, cuda_graph=False).generate(input_ids=prompts, sampling_params=PARAMS)
    e = engine(path, cuda_graph=False)
    e.runner.graphs = DecodeGraphs(e.runner, 8, capture=DEVICE == "cuda")
    got = e.generate(input_ids=prompts, sampling_params=PARAMS)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert (4, 0) in e.runner.graphs.graphs  # 3 requests decode in the bucket of 4


def test_triton_2d_grid_with_offloaded_rows_equals_all_local(tiny_model_factory):
    """Odd requests' attention goes through a LoopbackExchange over a second pool, in the
    (local, offloaded) cell's padded layout; tokens equal all-local."""
    run_2d_grid(tiny_model_factory("llama"), lambda remote, mc: LoopbackExchange(remote, 512))


def run_2d_grid(path: str, make_exchange, dtype: str = "float32") -> None:
    prompts = random_prompts(5, 512, [5, 19, 33], seed=6)
    want = engine(path, cuda_graph=False, dtype=dtype).generate(input_ids=prompts, sampling_params=PARAMS)
    e = engine(path, cuda_graph=False, dtype=dtype)
    r, mc = e.runner, e.runner.model_config
    remote_pool = KVPool(mc, r.pool.num_pages, r.page_size, r.dtype, r.device)
    remote = TritonAttentionBackend(remote_pool, mc.num_heads, mc.num_kv_heads, mc.head_dim)
    graphs = DecodeGraphs(r, 8, make_exchange(remote, mc), capture=DEVICE == "cuda")
    offloaded = {f"offline-{i}" for i in (1, 3)}
    schedule, forward = e.scheduler.schedule, r.forward

    def local_first():
        items = schedule()
        items.sort(key=lambda it: it.req.rid in offloaded)
        return items

    def grid_forward(batch, _remote=None):
        n_local = sum(it.req.rid not in offloaded for it in batch.items)
        if batch.attn.is_decode:
            logits = graphs.run(batch.input_ids, batch.positions, batch.attn, n_local)
            return logits[batch.logits_rows]
        return forward(batch)  # prefill: all local (the remote pool gets these requests' KV below)

    def copy_prompt_kv(items):  # stand-in for the prefill writing offloaded KV into the executor pool
        for it in items:
            if it.req.rid in offloaded and it.start == 0:
                pages = torch.tensor(it.req.pages, device=r.device)
                for layer in range(mc.num_layers):
                    remote_pool.k[layer][pages] = r.pool.k[layer][pages]
                    remote_pool.v[layer][pages] = r.pool.v[layer][pages]

    e.scheduler.schedule, r.forward, e.scheduler.hooks.on_forward = local_first, grid_forward, copy_prompt_kv
    got = e.generate(input_ids=prompts, sampling_params=PARAMS)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert (4, 2) in graphs.graphs  # 3 local + 2 offloaded rows ran in the (4, 2) cell


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_tokens_equal_eager(tiny_model_factory):
    """The runner's own graphs (on by default) against the eager path: 8 requests fill the bucket
    of 8, so both run the same GEMM shapes."""
    path = tiny_model_factory("llama")
    prompts = random_prompts(8, 512, [5, 19, 33, 60], seed=8)
    eager = engine(path, cuda_graph=False).generate(input_ids=prompts, sampling_params=PARAMS)
    e = engine(path)
    got = e.generate(input_ids=prompts, sampling_params=PARAMS)
    assert e.runner.graphs is not None and (8, 0) in e.runner.graphs.graphs
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in eager]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_replay_equals_eager_step(tiny_model_factory, dtype):
    """One padded decode step (5 requests in the bucket of 8) replayed from a graph equals the
    same step run eagerly over the same static buffers."""
    e = engine(tiny_model_factory("llama"), cuda_graph=False, dtype=dtype)
    r = e.runner
    for t in r.pool.k + r.pool.v:
        t.normal_()
    lens = [7, 20, 33, 1, 64]
    tables, page = [], 0
    for n in lens:
        tables.append(list(range(page, page + -(-n // r.page_size))))
        page += len(tables[-1])
    slots = torch.tensor(
        [t[(n - 1) // r.page_size] * r.page_size + (n - 1) % r.page_size for t, n in zip(tables, lens)]
    )
    batch = AttentionBatch([1] * 5, lens, tables, slots.cuda())
    ids = torch.randint(2, 512, (5,), device="cuda")
    pos = torch.tensor([n - 1 for n in lens], device="cuda")
    eager = DecodeGraphs(r, 8, capture=False).run(ids, pos, batch, 5)
    graph = DecodeGraphs(r, 8, capture=True)
    replayed = graph.run(ids, pos, batch, 5)
    assert graph.graphs[(8, 0)].graph is not None
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert torch.allclose(replayed, eager, atol=tol, rtol=tol), (replayed - eager).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_2d_grid_over_cuda_ipc_exchange(tiny_model_factory):
    """The offloaded group through the flag-synchronised exchange: an IpcAttentionServer graph on
    its own stream (one process; two under MPS work the same) answers every layer in-graph."""
    from adrenaline.runner.ipc_exchange import CudaIpcExchange, ExchangeBuffers, IpcAttentionServer

    def make(remote, mc):
        buffers = ExchangeBuffers.create(
            8, (mc.num_heads, mc.num_kv_heads, mc.head_dim), remote.pool.dtype, "cuda"
        )
        server = IpcAttentionServer(remote, buffers, mc.num_layers)
        width = -(-512 // remote.pool.page_size)
        return CudaIpcExchange(buffers, mc.num_layers, lambda batch, rows: server.step(batch, rows, width))

    run_2d_grid(tiny_model_factory("llama"), make)
