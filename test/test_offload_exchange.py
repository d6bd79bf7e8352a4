"""The per-layer exchange without servers: an ``AttentionExecutor`` (in a thread, over its own
pool) serving an ``OffloadClient`` through real ZeroMQ transports and through the shared-memory
channel, against local attention over the same KV; a stopped executor under shared memory; the
static ratio policy; executor page accounting and its ledger of future KV; protocol version
mismatch."""

from __future__ import annotations

import glob
import os
import signal
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
from adrenaline.offload.exchange import AttentionExchange, Group, TransportExchange
from adrenaline.offload.executor import AttentionExecutor
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.policy import LoadView, StaticRatioPolicy
from adrenaline.offload.process import start_executor
from adrenaline.offload.protocol import OFFLOAD, AttnQKV, AttnStep, ExecAlloc
from adrenaline.offload.shm import ShmExchange
from adrenaline.scheduler.placement import LocalLoad
from adrenaline.transport import ZmqTransport
from adrenaline.transport.kv_pages import gather_pages, scatter_pages
from adrenaline.transport.shm_segment import ShmLayout

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


def shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/adrenaline-*"))


def make_exchange(kind: str, t: ZmqTransport, timeout_s: float, max_rows: int = 8) -> AttentionExchange:
    if kind == "tcp":
        return TransportExchange(t)
    return ShmExchange(t, ShmLayout(max_rows, H, HKV, D, torch.float32), timeout_s, mode=kind)


def reserve(
    t: ZmqTransport,
    executor: AttentionExecutor | tuple[str, KVPool],
    room: int,
    tokens: int,
    future: int = 0,
    client: str = "",
) -> list[int] | None:
    """Pages for ``room`` through the prefill side's link, pumped until the executor answers;
    ``executor``: one in this process, or a process's (address, pool)."""
    address, pool = (
        (executor.transport.address, executor.pool) if isinstance(executor, AttentionExecutor) else executor
    )
    link = ExecutorLink(t, address, pool, pool, ask_timeout_s=30)
    granted = []
    link.reserve(room, tokens, granted.append, future, client)
    while not granted:  # generous timeout: CI machines can be loaded
        link.handle(t.recv(lambda m: True, 30))
    return granted[0]


def place_prompts(executor: AttentionExecutor, g: torch.Generator, prompt_lens: list[int]):
    """Random prompt KV in a local pool and, through the prefill side's link, in the executor's."""
    local = make_pool(64)
    local_pages = [[8 * i + j for j in range(4)] for i in range(len(prompt_lens))]  # prompt + 1 each
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
    prefill.close()
    return local, local_pages, targets


def run_step(client: OffloadClient, local: KVPool, local_pages, seq_lens: list[int], g: torch.Generator):
    """One decode step through the client, each layer checked against local attention."""
    slots = torch.tensor(
        [local_pages[i][(n - 1) // PAGE] * PAGE + (n - 1) % PAGE for i, n in enumerate(seq_lens)]
    )
    batch = AttentionBatch([1] * len(seq_lens), seq_lens, local_pages, slots)
    backend = TorchAttentionBackend(local, H, HKV, D)
    backend.plan(batch)
    client.begin(batch)
    for layer in range(LAYERS):
        q = torch.randn(len(seq_lens), H, D, generator=g)
        k, v = (
            torch.randn(len(seq_lens), HKV, D, generator=g),
            torch.randn(len(seq_lens), HKV, D, generator=g),
        )
        client.submit(layer, q, k, v)
        want = backend.forward(layer, q, k, v)
        got = client.wait(layer)
        assert torch.allclose(got, want, atol=1e-5), (layer, (got - want).abs().max())


@pytest.mark.parametrize("kind,max_rows", [("tcp", 8), ("shm", 8), ("auto", 2)])
def test_offloaded_attention_equals_local_per_layer(executor, kind, max_rows):
    """Two decode steps; ``auto`` with 2 rows per channel sends the 3-row group over TCP."""
    before = shm_files()
    g = torch.Generator().manual_seed(0)
    prompt_lens = [5, 9, 13]
    local, local_pages, targets = place_prompts(executor, g, prompt_lens)
    decode = ZmqTransport()
    exchange = make_exchange(kind, decode, 30, max_rows)
    client = OffloadClient(exchange, timeout_s=30)
    client.prepare(targets)
    for step in range(2):
        run_step(client, local, local_pages, [n + 1 + step for n in prompt_lens], g)
    (times,) = client.recent  # the first step, completed when the second began
    assert times.executor_wait_s > 0 and times.exchange_s > 0 and times.local_attention_s > 0
    if isinstance(exchange, ShmExchange):
        assert list(exchange.channels) == [executor.transport.address]  # same host: attached
        assert executor.shm.peers() == [f"shm:{decode.address}"]
    assert executor.stats().requests == 3 and executor.layers_served == 2 * LAYERS
    for target in targets:
        client.free(*target)
    client.flush()
    deadline = time.monotonic() + 30
    while executor.allocator.num_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.allocator.num_used == 0 and executor.stats().requests == 0
    exchange.close()
    decode.close()
    assert shm_files() <= before  # no segment of ours left in /dev/shm


@pytest.mark.parametrize("mode", ["shm", "auto"])
def test_stopped_executor_under_shm_falls_back(executor, mode):
    """The executor drops the channel mid-run: the next step raises ``RemoteAttentionError`` (the
    scheduler recomputes locally) well within the timeout; ``auto`` then serves over TCP."""
    before = shm_files()
    g = torch.Generator().manual_seed(1)
    local, local_pages, targets = place_prompts(executor, g, [6, 7])
    decode = ZmqTransport()
    exchange = make_exchange(mode, decode, 20)
    client = OffloadClient(exchange, timeout_s=20)
    client.prepare(targets)
    run_step(client, local, local_pages, [7, 8], g)
    executor.shm.close()  # a stopped executor: its end of the channel is closed
    tic = time.monotonic()
    with pytest.raises(RemoteAttentionError, match="closed"):
        run_step(client, local, local_pages, [8, 9], g)
    assert time.monotonic() - tic < 10 and not exchange.channels
    if mode == "auto":  # the executor still answers on ZeroMQ
        run_step(client, local, local_pages, [8, 9], g)
        assert executor.transport.address in exchange.tcp_only
    exchange.close()
    decode.close()
    assert shm_files() <= before


def test_shm_refused_across_layouts_keeps_tcp(executor):
    """An executor whose heads differ refuses the offer: ``auto`` keeps TCP, ``shm`` fails the step."""
    decode = ZmqTransport()
    for mode in ("auto", "shm"):
        exchange = ShmExchange(decode, ShmLayout(4, H * 2, HKV, D, torch.float32), 10, mode=mode)
        exchange.begin(1, [Group(executor.transport.address, 0, [7], [4])], {})
        assert not exchange.channels
        if mode == "auto":
            assert executor.transport.address in exchange.tcp_only
        else:
            with pytest.raises(RemoteAttentionError, match="do not match"):
                exchange.wait(1, 0, Group(executor.transport.address, 0, [7], [4]), 1)
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


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_rooms_of_a_decode_peer_that_is_gone_are_freed(executor, kind):
    """A decode instance dies with offloaded requests: the executor frees the rooms it stepped as
    soon as its connection drops or its channel closes, not after ``ROOM_IDLE_S``."""
    decode = ZmqTransport()
    assert reserve(decode, executor, 7, 3) is not None
    exchange = make_exchange(kind, decode, 30)
    client = OffloadClient(exchange, timeout_s=30)
    client.prepare([(executor.transport.address, 7)])
    client.begin(AttentionBatch([1], [4], [[]], torch.tensor([-1])))
    client.submit(0, torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    client.wait(0)
    assert list(executor.pages) == [7]
    exchange.close()
    decode.close()
    deadline = time.monotonic() + 30
    while executor.pages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.pages == {} and executor.allocator.num_used == 0


def test_executor_refuses_when_full(executor):
    t = ZmqTransport()
    assert len(reserve(t, executor, 1, 60 * PAGE)) == 60
    assert reserve(t, executor, 2, 10 * PAGE) is None and 2 not in executor.pages
    t.close()


def test_executor_ledger_commits_future_kv_fairly_per_decode_instance(executor):
    """256 tokens of room: a prompt's pages are allocated, its whole future KV is committed."""
    t = ZmqTransport()
    assert reserve(t, executor, 1, 8, future=200, client="d0") is not None  # alone: all the room
    assert reserve(t, executor, 2, 8, future=57, client="d1") is None  # 257 > 256
    assert reserve(t, executor, 3, 8, future=56, client="d1") is not None
    ExecutorLink(t, executor.transport.address, executor.pool, executor.pool).free([1])
    assert reserve(t, executor, 4, 8, future=129, client="d0") is None  # two now: 128 each
    assert reserve(t, executor, 5, 8, future=128, client="d0") is not None
    stats = executor.stats()
    assert (stats.capacity_tokens, stats.committed) == (256, {"d0": 128, "d1": 56})
    assert stats.refused == {"memory": 1, "fair_share": 1} and stats.requests == 2
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


@pytest.mark.parametrize("kind", ["tcp", "shm"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_executor_process_is_seen_at_once_without_leftovers(sig, kind):
    """A real executor process, killed: the next step raises ``RemoteAttentionError`` (local
    recomputation) when the process exits (its pidfd, its closed socket), long before the 30 s
    timeout; its page counts, reported with each step, are dropped; ``/dev/shm`` is clean."""
    before = shm_files()
    pool = make_pool(8)
    proc, address = start_executor(pool, H, HKV, "torch", ("tcp", "127.0.0.1", None))
    decode = ZmqTransport()
    assert reserve(decode, (address, pool), 7, 3) is not None
    exchange = make_exchange(kind, decode, 30)
    client = OffloadClient(exchange, timeout_s=30)
    client.prepare([(address, 7)])
    batch = AttentionBatch([1], [4], [[]], torch.tensor([-1]))
    qkv = (torch.zeros(1, H, D), torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
    client.begin(batch)
    client.submit(0, *qkv)
    assert client.wait(0).shape == (1, H, D)
    assert exchange.executor_pages == {address: (1, 8)} and not exchange.gone(address)
    assert list(getattr(exchange, "channels", [address])) == [address]
    try:
        os.kill(proc.pid, sig)
        proc.join(30)  # exited (a SIGTERM'd executor may still answer a step that beats the signal)
        tic = time.monotonic()
        with pytest.raises(RemoteAttentionError):
            client.begin(batch)
            client.submit(0, *qkv)
            client.wait(0)
        assert time.monotonic() - tic < 10, "the death was seen by the timeout, not when the process exited"
        assert exchange.gone(address) and exchange.executor_pages == {}
        assert not getattr(exchange, "channels", {})
    finally:  # even when failing: a ZeroMQ context left to the garbage collector can block in term()
        exchange.close()
        decode.close()
    assert shm_files() <= before
