"""The per-layer exchange without servers: an ``AttentionExecutor`` (in a thread, over its own
pool) serving an ``OffloadClient`` through real ZeroMQ transports, against local attention over
the same KV; the static ratio policy; executor page accounting; protocol version mismatch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adrenaline.attention.base import RemoteAttentionError
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.core.batch import AttentionBatch
from adrenaline.kv_cache.pool import KVPool
from adrenaline.model_config import ModelConfig
from adrenaline.offload.client import OffloadClient
from adrenaline.offload.exchange import TransportExchange
from adrenaline.offload.executor import AttentionExecutor
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.policy import LoadView, StaticRatioPolicy
from adrenaline.offload.protocol import OFFLOAD, AttnQKV, AttnStep, ExecAlloc
from adrenaline.scheduler.placement import LocalLoad
from adrenaline.transport import ZmqTransport
from adrenaline.transport.kv_pages import gather_pages, scatter_pages

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


def reserve(t: ZmqTransport, executor: AttentionExecutor, room: int, tokens: int) -> list[int] | None:
    """Pages for ``room`` through the prefill side's link, pumped until the executor answers."""
    link = ExecutorLink(t, executor.transport.address, executor.pool, executor.pool, ask_timeout_s=30)
    granted = []
    link.reserve(room, tokens, granted.append)
    while not granted:  # generous timeout: CI machines can be loaded
        link.handle(t.recv(lambda m: True, 30))
    return granted[0]


def test_offloaded_attention_equals_local_per_layer(executor):
    g = torch.Generator().manual_seed(0)
    prompt_lens = [5, 9, 13]
    local = make_pool(64)
    local_pages = [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]  # room for prompt + 1 each
    prefill = ZmqTransport()  # plays the prefill scheduler: places prompt KV in the shared pool
    targets = []
    for i, n in enumerate(prompt_lens):
        pages = torch.tensor(local_pages[i][: -(-n // PAGE)])
        for layer in range(LAYERS):
            kv = torch.randn(2, len(pages) * PAGE, HKV, D, generator=g)
            local.k[layer][pages] = kv[0].view(-1, PAGE, HKV, D)
            local.v[layer][pages] = kv[1].view(-1, PAGE, HKV, D)
        pages = reserve(prefill, executor, 100 + i, n)
        scatter_pages(executor.pool, pages, gather_pages(local, local_pages[i][: len(pages)]))
        targets.append((executor.transport.address, 100 + i))
    decode = ZmqTransport()
    client = OffloadClient(TransportExchange(decode), timeout_s=30)
    client.prepare(targets)
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
    assert executor.stats().requests == 3 and executor.layers_served == LAYERS
    for target in targets:
        client.free(*target)
    client.flush()
    deadline = time.monotonic() + 30
    while executor.allocator.num_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.allocator.num_used == 0 and executor.stats().requests == 0
    prefill.close()
    decode.close()


def test_unknown_room_and_dead_executor_raise(executor):
    decode = ZmqTransport()
    client = OffloadClient(TransportExchange(decode), timeout_s=1)
    client.prepare([(executor.transport.address, 7)])
    batch = AttentionBatch([1], [4], [[]], torch.tensor([-1]))
    client.begin(batch)
    client.submit(0, torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    with pytest.raises(RemoteAttentionError, match="unknown bootstrap rooms"):
        client.wait(0)
    client.prepare([("tcp://127.0.0.1:9", 7)])  # nobody there
    client.begin(batch)
    client.submit(0, torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    with pytest.raises(RemoteAttentionError, match="did not answer layer 0"):
        client.wait(0)
    decode.close()


def test_executor_refuses_when_full(executor):
    t = ZmqTransport()
    assert len(reserve(t, executor, 1, 60 * PAGE)) == 60
    assert reserve(t, executor, 2, 10 * PAGE) is None and 2 not in executor.pages
    t.close()


def test_version_mismatch_names_both_versions(executor):
    """A peer speaking another protocol version gets an error naming both, wherever it waits."""
    t = ZmqTransport()
    address = executor.transport.address
    OFFLOAD.send(t, address, ExecAlloc(OFFLOAD.version + 1, 1, 5, PAGE))
    reply = OFFLOAD.parse(t.recv(lambda m: True, 30))
    assert (
        f"speaks version {OFFLOAD.version}" in reply.error
        and f"speaks version {OFFLOAD.version + 1}" in reply.error
    )
    assert 5 not in executor.pages
    OFFLOAD.send(t, address, AttnStep(OFFLOAD.version + 1, 1, [5], [4], []))
    OFFLOAD.send(t, address, AttnQKV(1, 0), [torch.zeros(1, H + 2 * HKV, D)])
    answer = OFFLOAD.parse(t.recv(lambda m: True, 30))
    assert "protocol version mismatch" in answer.message
    t.close()


@pytest.mark.parametrize(
    "ratio,cap,expected",
    [(0, None, 0), (0.5, None, 3), (1.0, None, 5), (float("inf"), None, 10), (float("inf"), 4, 4)],
)
def test_static_ratio_policy(ratio, cap, expected):
    policy = StaticRatioPolicy(ratio, cap)
    offloaded = 0
    for n in range(10):
        decision = policy.decide(LoadView(LocalLoad(n, 100, PAGE), offloaded), None)  # type: ignore[arg-type]
        offloaded += decision.offload
        assert decision.reason
    assert offloaded == expected
