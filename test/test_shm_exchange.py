"""The same-host shared-memory exchange between real processes: exact round trips of random q/k/v
against an oracle computed here, step metadata and frees, layout checks, oversize refusal, dead and
stopped peers, /dev/shm cleanup, an idle executor's CPU time, two decode peers at once."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import asdict

import msgspec
import psutil
import pytest
import torch
from conftest import freeze

from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport import PeerTimeout, TransportError
from adrenaline.transport.cuda_ipc_exchange import CudaIpcClientChannel
from adrenaline.transport.doorbell import supported
from adrenaline.transport.shm_exchange import ShmClientChannel, StepMeta
from adrenaline.transport.shm_segment import (
    PREFIX,
    SHM_DIR,
    BatchTooLarge,
    ShmLayout,
    ShmLayoutError,
    reap_stale,
)
from adrenaline.transport.shm_server import ShmExecutorChannel, ShmServer

pytestmark = pytest.mark.skipif(not supported(), reason="the shared-memory exchange is Linux x86-64 only")

H, HKV, D, MAX_ROWS = 4, 2, 16, 8
HEADS = (H, HKV, D)
SPAWN = mp.get_context("spawn")
WAIT_S = 60  # generous deadline for events on a loaded machine; never a timing assertion


def oracle(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What the test executor answers: exact to compute on both sides, uses every input."""
    return q * 2 - torch.cat([k, v], dim=1) + layer


def _executor(conn, gate, device: str) -> None:
    """An executor process: ShmServer over ``oracle``; peer "slow" blocks at layer 0 on ``gate``,
    peer "hang" blocks at layer 1 forever. Commands arrive over ``conn``."""
    torch.set_num_threads(1)
    steps: list[dict] = []

    def attend(meta: StepMeta, layer: int, q, k, v) -> torch.Tensor:
        if meta.peer == "slow" and layer == 0:
            gate.wait(WAIT_S)
        if meta.peer == "hang" and layer == 1:
            time.sleep(3600)
        return oracle(layer, q, k, v)

    server = ShmServer(attend, begin=lambda m: steps.append(asdict(m)), device=device)
    while True:
        cmd, arg = conn.recv()
        if cmd == "add":
            server.add(arg[0], arg[1], HEADS)
            conn.send("ok")
        elif cmd == "steps":
            conn.send(steps)
        elif cmd == "stop":
            server.close()
            conn.send("ok")
            return


class Executor:
    def __init__(self, device: str = "cpu") -> None:
        self.conn, child = SPAWN.Pipe()
        self.gate = SPAWN.Event()
        self.proc = SPAWN.Process(target=_executor, args=(child, self.gate, device), daemon=True)
        self.proc.start()

    def ask(self, cmd: str, arg=None):
        self.conn.send((cmd, arg))
        assert self.conn.poll(WAIT_S), f"executor did not answer {cmd}"
        return self.conn.recv()

    def connect(self, peer: str, timeout_s: float = 30, layout: ShmLayout | None = None) -> ShmClientChannel:
        ch = ShmClientChannel.create(layout or ShmLayout(MAX_ROWS, *HEADS), timeout_s)
        assert self.ask("add", (peer, ch.offer())) == "ok"
        ch.wait_attached(WAIT_S)
        return ch

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(WAIT_S)


@pytest.fixture
def executor():
    ex = Executor()
    yield ex
    ex.stop()


def leftovers(*pids: int) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if any(n.startswith(f"{PREFIX}-{p}-") for p in pids)]


def rand_qkv(rows: int, g: torch.Generator, dtype: torch.dtype = torch.float32):
    return tuple(torch.randn(rows, h, D, generator=g).to(dtype) for h in (H, HKV, HKV))


def run_layers(ch: ShmClientChannel, layers: int, rows: int, g: torch.Generator, dtype=torch.float32) -> None:
    for layer in range(layers):
        q, k, v = rand_qkv(rows, g, dtype)
        ch.submit(layer, q, k, v)
        assert torch.equal(ch.wait(layer), oracle(layer, q, k, v)), layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trips_are_exact_and_metadata_arrives(executor, dtype):
    g = torch.Generator().manual_seed(0)
    ch = executor.connect("d", layout=ShmLayout(MAX_ROWS, *HEADS, dtype, max_frees=2))
    assert not leftovers(os.getpid())  # unlinked as soon as the executor attached
    steps = [
        ([3, 1, 4], [10, 20, 30], [7, 8, 9]),
        (list(range(MAX_ROWS)), [5] * MAX_ROWS, []),
        ([2], [6], []),
    ]
    for i, (rooms, lens, frees) in enumerate(steps):
        assert ch.begin(i + 1, rooms, lens, frees) == min(len(frees), 2)  # the third free waits
        run_layers(ch, 5, len(rooms), g, dtype)
    assert ch.post_frees([9, 11]) == 2
    ch.begin(9, [1], [2])  # drains the frees-only message first
    got = executor.ask("steps")
    assert [(s["step"], s["rooms"], s["seq_lens"], s["frees"]) for s in got] == [
        (1, [3, 1, 4], [10, 20, 30], [7, 8]),
        (2, list(range(MAX_ROWS)), [5] * MAX_ROWS, []),
        (3, [2], [6], []),
        (3, [], [], [9, 11]),
    ]
    assert {s["peer"] for s in got} == {"d"}
    ch.close()
    assert not leftovers(os.getpid(), executor.proc.pid)


def test_oversize_batch_refused_and_channel_stays_usable(executor):
    ch = executor.connect("d")
    with pytest.raises(BatchTooLarge, match=f"holds {MAX_ROWS}"):
        ch.begin(1, list(range(MAX_ROWS + 1)), [1] * (MAX_ROWS + 1))
    ch.begin(2, [1, 2], [3, 4])
    with pytest.raises(ValueError, match="do not match"):
        ch.submit(0, *rand_qkv(3, torch.Generator()))  # more rows than begun: refused, not written
    run_layers(ch, 2, 2, torch.Generator().manual_seed(1))
    ch.close()


def test_version_and_layout_mismatch_are_refused():
    layout = ShmLayout(MAX_ROWS, *HEADS)
    ch = ShmClientChannel.create(layout, 5)
    offer = ch.offer()
    with pytest.raises(ShmLayoutError, match="protocol"):
        ShmExecutorChannel.attach({**offer, "version": 99}, "p", HEADS)
    with pytest.raises(ShmLayoutError, match="heads"):
        ShmExecutorChannel.attach(offer, "p", (H, HKV, D * 2))
    bigger = {**offer, "layout": {**offer["layout"], "max_rows": MAX_ROWS + 64}}
    with pytest.raises(ShmLayoutError, match="bytes"):
        ShmExecutorChannel.attach(bigger, "p", HEADS)
    with pytest.raises(PeerTimeout):  # nobody attached; the segment is unlinked all the same
        ch.wait_attached(0.3)
    assert not leftovers(os.getpid())

    ch = ShmClientChannel.create(layout, 5)
    offer = ch.offer()
    same_size = {**offer, "layout": {**offer["layout"], "max_frees": layout.max_frees - 6}}
    assert ShmLayout.from_dict(same_size["layout"]).size == layout.size
    with pytest.raises(ShmLayoutError, match="differs"):  # the header tells
        ShmExecutorChannel.attach(same_size, "p", HEADS)
    with pytest.raises(TransportError, match="peer closed"):  # the refusing side said so
        ch.wait_attached(WAIT_S)
    assert not leftovers(os.getpid())


def test_dead_executor_raises_instead_of_hanging(executor):
    ch = executor.connect("hang", timeout_s=WAIT_S)
    ch.begin(1, [1], [2])
    run_layers(ch, 1, 1, torch.Generator())
    ch.submit(1, *rand_qkv(1, torch.Generator()))  # the executor never answers layer 1
    os.kill(executor.proc.pid, signal.SIGKILL)
    with pytest.raises(TransportError, match="gone") as e:
        ch.wait(1)
    assert not isinstance(e.value, PeerTimeout)  # noticed the death, not the deadline
    with pytest.raises(TransportError, match="unusable"):
        ch.begin(2, [1], [3])
    ch.close()
    executor.proc.join(WAIT_S)
    assert not leftovers(os.getpid(), executor.proc.pid)


def test_stopped_executor_times_out(executor):
    ch = executor.connect("d", timeout_s=0.5)
    ch.begin(1, [1], [2])
    freeze(executor.proc.pid)
    try:
        ch.submit(0, *rand_qkv(1, torch.Generator()))
        with pytest.raises(PeerTimeout):
            ch.wait(0)
    finally:
        os.kill(executor.proc.pid, signal.SIGCONT)
    ch.close()


def _decode(conn, handle_sigterm: bool) -> None:
    """A decode process: offers a channel, then (once attached) runs one layer and idles."""
    if handle_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as adrenaline's processes do
    ch = ShmClientChannel.create(ShmLayout(MAX_ROWS, *HEADS), WAIT_S)
    conn.send(ch.offer())
    if conn.recv() == "attach":
        ch.wait_attached(WAIT_S)
        ch.begin(1, [1], [2])
        run_layers(ch, 1, 1, torch.Generator())
        conn.send("served")
    time.sleep(3600)


def start_decode(handle_sigterm: bool = False):
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_decode, args=(child, handle_sigterm), daemon=True)
    proc.start()
    assert conn.poll(WAIT_S)
    return proc, conn, conn.recv()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_decode_ends_its_channel_without_leftovers(sig):
    closed = []
    server = ShmServer(lambda m, layer, q, k, v: oracle(layer, q, k, v), on_close=closed.append)
    proc, conn, offer = start_decode()
    server.add("d", offer, HEADS)
    conn.send("attach")
    assert conn.poll(WAIT_S) and conn.recv() == "served"
    assert server.peers() == ["d"]
    os.kill(proc.pid, sig)
    proc.join(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed == ["d"] and server.peers() == []
    assert not leftovers(os.getpid(), proc.pid)
    server.close()


@pytest.mark.parametrize(
    "sig,handled", [(signal.SIGTERM, True), (signal.SIGTERM, False), (signal.SIGKILL, False)]
)
def test_decode_killed_before_attach_leaves_nothing_behind(sig, handled):
    proc, conn, offer = start_decode(handle_sigterm=handled)
    assert leftovers(proc.pid) == [offer["name"]]  # the only window a file exists
    os.kill(proc.pid, sig)
    proc.join(WAIT_S)
    if not handled:  # no exit handler ran: the next create (or anyone) reaps it
        assert offer["name"] in reap_stale()
    assert not leftovers(proc.pid)
    with pytest.raises(TransportError, match="gone"):
        ShmExecutorChannel.attach(offer, "d", HEADS)


def test_idle_executor_burns_no_cpu(executor):
    ch = executor.connect("d")
    ch.begin(1, [1], [2])
    run_layers(ch, 2, 1, torch.Generator())
    proc = psutil.Process(executor.proc.pid)
    before = proc.cpu_times()
    time.sleep(1.0)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.05, f"idle executor used {used:.3f} s of CPU in 1 s"
    ch.close()


def test_two_decode_peers_do_not_block_each_other(executor):
    g = torch.Generator().manual_seed(2)
    slow, fast = executor.connect("slow"), executor.connect("fast")
    slow.begin(1, [1, 2], [3, 4])
    q, k, v = rand_qkv(2, g)
    slow.submit(0, q, k, v)  # its executor thread now blocks on the gate
    fast.begin(1, [5], [6])
    run_layers(fast, 4, 1, g)  # served meanwhile
    executor.gate.set()
    assert torch.equal(slow.wait(0), oracle(0, q, k, v))
    slow.close()
    fast.close()


def test_real_attention_through_the_channel_equals_local():
    """An executor thread planning and running the torch backend per step through the channel
    (q/k/v arrive as views on shared memory) against the same attention computed here."""
    g, page, layers = torch.Generator().manual_seed(4), 4, 3
    kv = [torch.randn(16, page, HKV, D, generator=g) for _ in range(2 * layers)]
    here = KVPool.from_tensors([t.clone() for t in kv[:layers]], [t.clone() for t in kv[layers:]])
    there = KVPool.from_tensors(kv[:layers], kv[layers:])
    tables = {room: list(range(4 * room, 4 * room + 4)) for room in range(4)}  # room -> its pages

    def batch(rooms: list[int], seq_lens: list[int]) -> AttentionBatch:
        slots = [tables[r][(n - 1) // page] * page + (n - 1) % page for r, n in zip(rooms, seq_lens)]
        return AttentionBatch([1] * len(rooms), seq_lens, [tables[r] for r in rooms], torch.tensor(slots))

    remote = TorchAttentionBackend(there, *HEADS)
    server = ShmServer(
        lambda meta, layer, q, k, v: remote.forward(layer, q, k, v),
        begin=lambda meta: remote.plan(batch(meta.rooms, meta.seq_lens)),
    )
    ch = ShmClientChannel.create(ShmLayout(MAX_ROWS, *HEADS), WAIT_S)
    server.add("d", ch.offer(), HEADS)
    ch.wait_attached(WAIT_S)
    local = TorchAttentionBackend(here, *HEADS)
    for step, (rooms, lens) in enumerate([([0, 2, 3], [5, 9, 13]), ([1, 2], [16, 10])]):
        ch.begin(step, rooms, lens)
        local.plan(batch(rooms, lens))
        for layer in range(layers):
            q, k, v = rand_qkv(len(rooms), g)
            ch.submit(layer, q, k, v)
            want = local.forward(layer, q, k, v)
            assert torch.allclose(ch.wait(layer), want, atol=1e-6), (step, layer)
    assert all(torch.equal(a, b) for a, b in zip(here.k + here.v, there.k + there.v))  # same KV appended
    ch.close()
    server.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU")
def test_cuda_ipc_round_trips_are_exact():
    dev, g = torch.device("cuda", 0), torch.Generator().manual_seed(3)
    ex = Executor("cuda")
    try:
        ch = CudaIpcClientChannel.create_on(ShmLayout(MAX_ROWS, *HEADS, torch.bfloat16), WAIT_S, dev)
        offer = msgspec.msgpack.decode(msgspec.msgpack.encode(ch.offer()))  # as the control plane carries it
        assert ex.ask("add", ("g", offer)) == "ok"
        ch.wait_attached(WAIT_S)
        for step, rows in enumerate([1, 5, MAX_ROWS]):
            ch.begin(step, list(range(rows)), [4] * rows)
            for layer in range(4):
                q, k, v = (t.to(dev) for t in rand_qkv(rows, g, torch.bfloat16))
                ch.submit(layer, q, k, v)
                out = ch.wait(layer)
                assert out.is_cuda and torch.equal(out, oracle(layer, q, k, v)), (step, layer)
        ch.close()
    finally:
        ex.stop()
