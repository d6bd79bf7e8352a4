"""The Mooncake data planes on loopback TCP: KV pages land bit-identical in the pages the receiver
chose, each room's completion is announced, bad writes are refused before they leave, and a dead
or frozen peer is an error, not a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgspec
import pytest
import torch
from conftest import freeze

from adrenaline.kv_cache.pool import KVPool
from adrenaline.procs import spawn
from adrenaline.transport import mooncake_engine
from adrenaline.transport.base import PeerTimeout, TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine, RegionError, load_mooncake, mooncake_missing
from adrenaline.transport.mooncake_kv import KVPlaneDescriptor, LayoutMismatch, MooncakeKVPlane
from adrenaline.transport.mooncake_offload import OffloadLink, OffloadServer

MISSING = mooncake_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"Mooncake not installed: {MISSING}")

LAYERS, PAGE, HEADS, DIM = 3, 4, 3, 8

# A receiving instance in its own process: prints its descriptor, then, for each completed room,
# saves its pool to the file named on its command line and prints the room.
PEER = f"""
import sys, time, torch, msgspec
from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_kv import MooncakeKVPlane
shape = (12, {PAGE}, {HEADS}, {DIM})
layers = [[torch.zeros(shape, dtype=torch.bfloat16) for _ in range({LAYERS})] for _ in "kv"]
pool = KVPool.from_tensors(*layers)
plane = MooncakeKVPlane(pool, MooncakeEngine("127.0.0.1", "tcp", "", 30))
print(msgspec.json.encode(plane.descriptor()).decode(), flush=True)
while True:
    for room, _ in plane.landed():
        torch.save({{"k": pool.k, "v": pool.v}}, sys.argv[1])
        print(room, flush=True)
    time.sleep(0.01)
"""


def make_pool(
    pages: int, dtype: torch.dtype = torch.bfloat16, dim: int = DIM, seed: int | None = None
) -> KVPool:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (pages, PAGE, HEADS, dim)

    def tensor() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype) if gen else torch.zeros(shape, dtype=dtype)

    return KVPool.from_tensors([tensor() for _ in range(LAYERS)], [tensor() for _ in range(LAYERS)])


@pytest.fixture(scope="module")
def engines() -> tuple[MooncakeEngine, MooncakeEngine]:
    return MooncakeEngine(timeout_s=5), MooncakeEngine(timeout_s=5)


@pytest.fixture
def planes(engines):
    src = MooncakeKVPlane(make_pool(10, seed=0), engines[0])
    dst = MooncakeKVPlane(make_pool(12), engines[1])
    yield src, dst
    src.close()
    dst.close()


@pytest.fixture
def peer(tmp_path):
    """(descriptor, process, file it saves its pool to) of a receiving plane in another process."""
    out = tmp_path / "pool.pt"
    proc = spawn([sys.executable, "-c", PEER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        yield msgspec.json.decode(proc.stdout.readline(), type=KVPlaneDescriptor), proc, out
    finally:
        proc.kill()
        proc.wait()


def wait_rooms(plane: MooncakeKVPlane, n: int) -> list[int]:
    """The first ``n`` rooms announced (fewer after 10 s)."""
    rooms: list[int] = []
    deadline = time.monotonic() + 10
    while len(rooms) < n and time.monotonic() < deadline:
        rooms += [room for room, _ in plane.landed()]
        time.sleep(0.01)
    return rooms


def assert_pages_equal(
    src: list[torch.Tensor], dst: list[torch.Tensor], sp: list[int], dp: list[int]
) -> None:
    for s, d in zip(src, dst):  # bit-identical: compare the raw 16-bit patterns
        assert torch.equal(d[dp].view(torch.int16), s[sp].view(torch.int16))


def test_pages_cross_processes_bit_identical_then_dead_peer_fails(engines, peer):
    desc, proc, out = peer
    plane = MooncakeKVPlane(make_pool(10, seed=1), engines[0])
    try:
        session = plane.connect(desc)
        src, dst = [1, 2, 3, 7, 5, 0], [9, 10, 11, 0, 4, 6]  # runs 1-3 -> 9-11, then scattered
        plane.write_pages(session, src[:4], dst[:4])  # a first chunk
        plane.write_pages(session, src[4:], dst[4:], notice=(2**63 + 5, 1))  # the rest, and done
        assert proc.stdout.readline().strip() == str(2**63 + 5)
        got = torch.load(out)
        assert_pages_equal(plane.pool.k, got["k"], src, dst)
        assert_pages_equal(plane.pool.v, got["v"], src, dst)
        untouched = [p for p in range(12) if p not in dst]
        assert all(not t[untouched].any() for t in got["k"] + got["v"])
        assert plane.stats.pages == 6 and plane.stats.writes == 2

        proc.kill()
        proc.wait()
        with pytest.raises(TransportError):
            plane.write_pages(session, [1], [2], notice=(7, 1))
        assert plane.peers == {} and plane.stats.failures == 1  # nothing left pending: connect again
    finally:
        plane.close()


def test_rooms_announced_once_each_in_process(planes):
    src, dst = planes
    session = src.connect(dst.descriptor())
    src.write_pages(session, [0, 1], [5, 6])  # a chunk without a room announces nothing
    src.write_pages(session, [2], [7], notice=(11, 1))
    src.write_pages(session, [], [], notice=(12, 1))  # everything was sent before: the notice alone
    src.write_pages(session, [3, 4, 8], [0, 1, 2], notice=(13, 1))
    assert sorted(wait_rooms(dst, 3)) == [11, 12, 13]
    assert dst.landed() == [] and dst.fenced() == []
    src.fence(session, 14)  # no more writes into room 14's pages
    deadline = time.monotonic() + 10
    while not (fenced := dst.fenced()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fenced == [14]
    assert_pages_equal(src.pool.k, dst.pool.k, [0, 1, 2, 3, 4, 8], [5, 6, 7, 0, 1, 2])
    assert_pages_equal(src.pool.v, dst.pool.v, [0, 1, 2, 3, 4, 8], [5, 6, 7, 0, 1, 2])


def test_long_page_lists_go_in_several_batches_one_notice(planes, monkeypatch):
    monkeypatch.setattr(mooncake_engine, "MAX_BATCH", 4)  # the engine's lane rejects ~3000 entries
    src, dst = planes
    session = src.connect(dst.descriptor())
    sp, dp = [0, 2, 4, 6, 8, 9], [11, 1, 7, 3, 5, 0]  # 6 runs x 6 tensors: 36 entries, 9 batches
    src.write_pages(session, sp, dp, notice=(21, 1))
    src.write_pages(session, [], [], notice=(22, 1))
    assert wait_rooms(dst, 2) == [21, 22]  # in order: only the last batch rang
    assert_pages_equal(src.pool.k + src.pool.v, dst.pool.k + dst.pool.v, sp, dp)


@pytest.mark.parametrize("src_pages, dst_pages", [([0, 1], [11, 12]), ([0], [-1]), ([10], [0])])
def test_write_outside_registered_region_refused(planes, src_pages, dst_pages):
    src, dst = planes
    session = src.connect(dst.descriptor())
    with pytest.raises(RegionError):
        src.write_pages(session, src_pages, dst_pages, notice=(3, 1))
    assert all(not t.any() for t in dst.pool.k + dst.pool.v)  # refused before anything was issued
    assert session in src.peers and src.stats.failures == 0  # our mistake, not the peer's
    src.write_pages(session, [0], [0], notice=(4, 1))
    assert wait_rooms(dst, 1) == [4]  # notices keep their order: room 3 was never announced


@pytest.mark.parametrize("dtype, dim", [(torch.float16, DIM), (torch.bfloat16, DIM * 2)])
def test_layout_mismatch(engines, planes, dtype, dim):
    src, _ = planes
    other = MooncakeKVPlane(make_pool(12, dtype=dtype, dim=dim), engines[1])
    try:
        with pytest.raises(LayoutMismatch, match="layout differs"):
            src.connect(other.descriptor())
        assert src.peers == {}
    finally:
        other.close()


def test_frozen_peer_is_an_error_within_the_timeout(peer):
    desc, proc, _ = peer
    plane = MooncakeKVPlane(make_pool(10, seed=2), MooncakeEngine(timeout_s=1))
    try:
        session = plane.connect(desc)
        plane.write_pages(session, [0], [0])
        freeze(proc.pid)
        start = time.monotonic()
        with pytest.raises(TransportError):
            plane.write_pages(session, list(range(10)), list(range(10)), notice=(1, 1))
        # The engine's own default waits far longer (MC_TRANSFER_TIMEOUT alone gives ~5 s here).
        assert time.monotonic() - start < 4
        assert plane.peers == {}
    finally:
        plane.close()


def test_offload_exchange_round_trip(engines):
    heads, dtype = (HEADS * 3, HEADS, DIM), torch.bfloat16
    server = OffloadServer(engines[0], heads, dtype)
    link = OffloadLink(engines[1], heads, dtype, max_rows=8)
    try:
        link.connect(server.attach(link.endpoint()))
        link.begin(1, {"rooms": [4, 9], "seq_lens": [17, 3], "frees": [2]})
        qkv = torch.randn(2, heads[0] + 2 * heads[1], DIM).to(dtype)
        link.submit(0, qkv)
        events = poll_until(server, 2)
        assert [e.meta["kind"] for e in events] == ["step", "qkv"]
        assert events[0].meta["rooms"] == [4, 9] and events[0].meta["frees"] == [2]
        assert events[1].meta["layer"] == 0 and torch.equal(
            events[1].qkv.view(torch.int16), qkv.view(torch.int16)
        )
        out = torch.randn(2, heads[0], DIM).to(dtype)
        server.reply(events[1].peer, 1, 0, out)
        assert torch.equal(link.wait(0, timeout_s=5).view(torch.int16), out.view(torch.int16))

        link.submit(1, qkv)
        server.error(poll_until(server, 1)[0].peer, 1, 1, "pool full")
        with pytest.raises(TransportError, match="pool full"):
            link.wait(1, timeout_s=5)
        link.submit(2, qkv)
        with pytest.raises(PeerTimeout):
            link.wait(2, timeout_s=0.2)
        link.free([4, 9])
        assert [e.meta for e in poll_until(server, 2)][1] == {"kind": "free", "rooms": [4, 9]}
        server.detach(events[0].peer)  # the executor dropped this decode side: its buffer is gone
        with pytest.raises(TransportError):
            link.submit(0, qkv)
    finally:
        link.close()
        server.close()


def poll_until(server: OffloadServer, n: int):
    events, deadline = [], time.monotonic() + 10
    while len(events) < n and time.monotonic() < deadline:
        events += server.poll()
        time.sleep(0.005)
    return events


def test_protocol_that_would_fall_back_is_refused():
    if not os.path.exists("/sys/class/infiniband"):
        with pytest.raises(TransportError, match="fall back to TCP"):
            MooncakeEngine(protocol="rdma", device="mlx5_0")
    if not load_mooncake().SUPPORT_MNNVL:
        with pytest.raises(TransportError, match="no nvlink support"):
            MooncakeEngine(protocol="nvlink")
    with pytest.raises(ValueError, match="unknown Mooncake protocol"):
        MooncakeEngine(protocol="ib")


def test_missing_mooncake_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake", None)  # import fails as on a machine without it
    assert 'pip install -e ".[mooncake]"' in mooncake_missing()
    with pytest.raises(ImportError, match="libibverbs1"):
        MooncakeEngine()
