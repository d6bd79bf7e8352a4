"""The per-layer exchange without servers: an ``AttentionExecutor`` (in a thread, over its own
pool) serving an ``OffloadClient`` through real ZeroMQ transports, against local attention over
the same KV; the static ratio policy; executor page accounting."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.disaggregation.common import gather_pages, scatter_pages
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.executor import AttentionExecutor
from adrenaline.offload.policy import StaticRatioPolicy
from adrenaline.offload.protocol import EXEC_ALLOC, EXEC_REPLY
from adrenaline.scheduler.request import Req
from adrenaline.transport import PeerTimeout, TransportError, ZmqTransport

H, HKV, D, LAYERS, PAGE = 4, 2, 16, 3, 4


def make_pool(num_pages: int) -> KVPool:
    cfg = ModelConfig.__new__(ModelConfig)
    cfg.num_kv_heads, cfg.head_dim, cfg.num_layers = HKV, D, LAYERS
    return KVPool(cfg, num_pages, PAGE, torch.float32, "cpu")


@pytest.fixture
def executor():
    pool = make_pool(64)
    ex = AttentionExecutor(pool, ZmqTransport(), H, HKV, "torch")
    stop = threading.Event()
    thread = threading.Thread(target=ex.serve, args=(lambda: not stop.is_set(),), daemon=True)
    thread.start()
    yield ex
    stop.set()
    thread.join(5)
    ex.transport.close()


def ask(t: ZmqTransport, executor: AttentionExecutor, kind: str, meta: dict) -> dict:
    t.send(executor.transport.address, kind, {**meta, "ask": 1})
    return t.recv(lambda m: m.kind == EXEC_REPLY, 30).meta  # generous: CI machines can be loaded


def test_offloaded_attention_equals_local_per_layer(executor):
    g = torch.Generator().manual_seed(0)
    prompt_lens = [5, 9, 13]
    local = make_pool(64)
    local_pages = [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]  # room for prompt + 1 each
    prefill = ZmqTransport()  # plays the prefill scheduler: places prompt KV in the shared pool
    reqs = []
    for i, n in enumerate(prompt_lens):
        pages = torch.tensor(local_pages[i][: -(-n // PAGE)])
        for layer in range(LAYERS):
            kv = torch.randn(2, len(pages) * PAGE, HKV, D, generator=g)
            local.k[layer][pages] = kv[0].view(-1, PAGE, HKV, D)
            local.v[layer][pages] = kv[1].view(-1, PAGE, HKV, D)
        reply = ask(prefill, executor, EXEC_ALLOC, {"room": 100 + i, "tokens": n})
        scatter_pages(
            executor.pool, reply["pages"], gather_pages(local, local_pages[i][: len(reply["pages"])])
        )
        req = Req(f"r{i}", list(range(n)), None)  # type: ignore[arg-type]
        req.offload, req.extra["bootstrap"] = executor.transport.address, ("h", 1, 100 + i)
        reqs.append(req)
    decode = ZmqTransport()
    client = OffloadClient(decode, timeout_s=30)
    client.prepare(reqs)
    seq_lens = [n + 1 for n in prompt_lens]  # one new token each
    slots = torch.tensor([local_pages[i][n // PAGE] * PAGE + n % PAGE for i, n in enumerate(prompt_lens)])
    batch = AttentionBatch([1, 1, 1], seq_lens, local_pages, slots)
    backend = TorchAttentionBackend(local, H, HKV, D)
    backend.plan(batch)
    client.begin(batch)
    for layer in range(LAYERS):
        q = torch.randn(3, H, D, generator=g)
        k, v = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
        client.submit(layer, q, k, v)
        want = backend.forward(layer, q, k, v)
        got = client.wait(layer)
        assert torch.allclose(got, want, atol=1e-5), (layer, (got - want).abs().max())
    assert executor.stats()["requests"] == 3 and executor.layers_served == LAYERS
    for req in reqs:
        client.free(req)
    client.flush()
    deadline = time.monotonic() + 30
    while executor.allocator.num_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.allocator.num_used == 0 and executor.stats()["requests"] == 0
    prefill.close()
    decode.close()


def test_unknown_room_and_dead_executor_raise(executor):
    decode = ZmqTransport()
    client = OffloadClient(decode, timeout_s=1)
    req = Req("r", [1, 2, 3], None)  # type: ignore[arg-type]
    req.offload, req.extra["bootstrap"] = executor.transport.address, ("h", 1, 7)
    client.prepare([req])
    batch = AttentionBatch([1], [4], [[]], torch.tensor([-1]))
    client.begin(batch)
    client.submit(0, torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    with pytest.raises(TransportError, match="unknown bootstrap rooms"):
        client.wait(0)
    req.offload = "tcp://127.0.0.1:9"  # nobody there
    client.prepare([req])
    client.begin(batch)
    client.submit(0, torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    with pytest.raises(PeerTimeout):
        client.wait(0)
    decode.close()


def test_executor_refuses_when_full(executor):
    t = ZmqTransport()
    assert "pages" in ask(t, executor, EXEC_ALLOC, {"room": 1, "tokens": 60 * PAGE})
    reply = ask(t, executor, EXEC_ALLOC, {"room": 2, "tokens": 10 * PAGE})
    assert "full" in reply["error"] and 2 not in executor.pages
    t.close()


@pytest.mark.parametrize(
    "ratio,cap,expected",
    [(0, None, 0), (0.5, None, 3), (1.0, None, 5), (float("inf"), None, 10), (float("inf"), 4, 4)],
)
def test_static_ratio_policy(ratio, cap, expected):
    policy = StaticRatioPolicy(ratio, cap)
    local = offloaded = 0
    for _ in range(10):
        if policy.offload(local, offloaded):
            offloaded += 1
        else:
            local += 1
    assert offloaded == expected
