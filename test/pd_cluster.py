"""PD pairs for the tests. ``Cluster``: a pair (and an attention executor) in one process over an
in-memory network, driven like the scheduler process's loop: the harness of the PD and offload
state-machine tests. With ``kv_plane="mooncake"`` the KV pages (and with ``exchange="mooncake"``
the per-layer data) go over Mooncake Transfer Engines on loopback TCP instead, the control
messages still over the network. ``RouterPair``: a live pair of servers behind SGLang's router."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from server_utils import STARTUP_TIMEOUT_S, Server

from adrenaline import Engine, launch_pd
from adrenaline.config import EngineConfig
from adrenaline.core.request import Bootstrap, Req, finish_abort
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.disaggregation.decode import DecodeTransfers
from adrenaline.disaggregation.peers import PrefillDirectory
from adrenaline.disaggregation.prefill import PrefillTransfers
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.exchange import TransportExchange
from adrenaline.offload.executor import AttentionExecutor
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.manager import OffloadManager
from adrenaline.offload.mooncake_exchange import MooncakeExchange
from adrenaline.offload.policy import StaticRatioPolicy
from adrenaline.offload.shm import ShmExchange
from adrenaline.procs import free_port
from adrenaline.scheduler.hooks import SchedulerHooks
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.transport.memory import MemoryNetwork
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_pages import MooncakePages
from adrenaline.transport.shm_segment import ShmLayout

PAGE = 4
BOOT = ("prefill-host", 8998)
ENGINE_ARGS = dict(dtype="float32", page_size=PAGE, skip_tokenizer_init=True, max_total_tokens=512)


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)


class Cluster:
    def __init__(
        self,
        model: str,
        offload_ratio: float = 0.0,
        executor_pages: int = 128,
        pd_timeout: float = 60.0,
        offload_timeout: float = 60.0,
        exchange: str = "tcp",  # the decode side's per-layer data path: tcp, shm (shared memory), mooncake
        kv_plane: str = "tcp",  # how KV pages travel: tcp (messages) or mooncake (one-sided writes)
        decode_tokens: int = ENGINE_ARGS["max_total_tokens"],  # the decode instance's KV pool
        prefill_chunk: int = EngineConfig.chunked_prefill_size,  # the prefill's forward budget
    ) -> None:
        self.net = MemoryNetwork()
        engines = (
            3 if exchange == "mooncake" else 2 if kv_plane == "mooncake" else 0
        )  # prefill, decode, executor
        self.engines = [MooncakeEngine(timeout_s=pd_timeout) for _ in range(engines)]
        self.emitted: dict[str, list[Req]] = {"prefill": [], "decode": []}
        pe = Engine(model, **ENGINE_ARGS, chunked_prefill_size=prefill_chunk)
        de = Engine(model, **{**ENGINE_ARGS, "max_total_tokens": decode_tokens})
        self.p_sched = pe.scheduler
        pt, dt = self.net.endpoint(), self.net.endpoint()
        self.executor, link, self.exchange = None, None, None
        if offload_ratio > 0:
            mc = pe.runner.model_config
            self.shared = KVPool(mc, executor_pages, PAGE, torch.float32, "cpu")
            self.heads = (mc.num_heads, mc.num_kv_heads)
            self.proc, address = self.start_executor()
            link = ExecutorLink(pt, address, pe.runner.pool, self.shared)
        self.movers = [None, None]
        if kv_plane == "mooncake":
            self.movers = [MooncakePages(e.runner.pool, eng) for e, eng in zip((pe, de), self.engines)]
        emit = self.emitted["prefill"].append
        self._prefill_args = (pe.runner.pool, pd_timeout, emit, self.movers[0], link)
        self.prefill = self._start_prefill(pt)
        placement = None
        if offload_ratio > 0:
            mc = de.runner.model_config
            layout = ShmLayout(8, mc.num_heads, mc.num_kv_heads, mc.head_dim, torch.float32)
            data = {
                "tcp": lambda: TransportExchange(dt),
                "shm": lambda: ShmExchange(dt, layout, offload_timeout, "shm"),
                "mooncake": lambda: MooncakeExchange(
                    dt,
                    self.engines[1],
                    (mc.num_heads, mc.num_kv_heads, mc.head_dim),
                    torch.float32,
                    8,
                    offload_timeout,
                ),
            }[exchange]()
            self.exchange = data
            placement = OffloadManager(StaticRatioPolicy(offload_ratio), data, offload_timeout)
        self.d_sched = Scheduler(de.runner, de.config, None, placement)
        self.bootstrap = {BOOT: pt.address}  # what the bootstrap server answers
        directory = PrefillDirectory(lambda *boot: self.bootstrap[boot], interval_s=None)
        directory.address(BOOT)  # known, as to a decode instance that has served requests from it
        emit = self.emitted["decode"].append
        args = (self.d_sched, de.runner.pool, dt, pd_timeout, emit, self.movers[1])
        self.decode = DecodeTransfers(*args, directory=directory)

    def _start_prefill(self, transport) -> PrefillTransfers:
        pool, timeout, emit, mover, link = self._prefill_args
        return PrefillTransfers(self.p_sched, pool, transport, timeout, emit, mover, executor=link)

    def restart_prefill(self) -> None:
        """The prefill instance dies and starts again (its scheduler idle): a new transport address."""
        assert not self.p_sched.has_work and not self.prefill.out
        self.net.cut(self.prefill.transport.address)
        self.p_sched.hooks = SchedulerHooks()
        self.prefill = self._start_prefill(self.net.endpoint())
        self.bootstrap[BOOT] = self.prefill.transport.address

    # ---- requests -----------------------------------------------------------------------------
    def add(self, rid: str, ids: list[int], n: int, room: int, side: str = "both") -> tuple[Req, Req]:
        boot = Bootstrap(*BOOT, room)
        p = Req(rid, list(ids), params(n), bootstrap=boot)
        d = Req(rid, list(ids), params(n), bootstrap=boot)
        if side in ("both", "decode"):
            self.decode.add_request(d)
        if side in ("both", "prefill"):
            self.prefill.add_request(p)
        return p, d

    def abort(self, side: str, rid: str) -> None:
        """As the control handler does: the PD role first, then the scheduler."""
        pd, sched = (self.prefill, self.p_sched) if side == "prefill" else (self.decode, self.d_sched)
        reason = finish_abort("aborted by request", 400)
        for holder in (pd, sched):
            self.emitted[side] += holder.abort(rid, reason)

    # ---- the loop -----------------------------------------------------------------------------
    def iterate(self, decode: bool = True) -> None:
        self.prefill.tick()
        if self.p_sched.has_work:
            self.emitted["prefill"] += self.prefill.after_step(self.p_sched.step())
        if decode:
            self.decode.tick()
            self.d_sched.placement.tick()
            if self.d_sched.has_work:
                self.emitted["decode"] += self.d_sched.step()

    def run(self, until, limit_s: float = 120.0, decode: bool = True) -> None:
        """Iterate until ``until()``; the wall-clock limit only guards against a hang."""
        deadline = time.monotonic() + limit_s
        while not until():
            assert time.monotonic() < deadline, "the cluster did not get there"
            self.iterate(decode)

    # ---- checks -------------------------------------------------------------------------------
    def idle(self) -> bool:
        busy = self.p_sched.has_work or self.d_sched.has_work or self.prefill.out or self.decode.inbound
        return not (busy or self.decode.fences)

    def assert_clean(self) -> None:
        """Every page and room back: both pools, the executor's, every PD table."""
        self.run(self.idle)
        assert self.p_sched.allocator.num_used == 0 and self.d_sched.allocator.num_used == 0
        assert not self.prefill.early
        if self.executor is not None:
            self.d_sched.placement.tick()  # frees go out with the next step, or now
            deadline = time.monotonic() + 60
            while self.executor.pages and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self.executor.pages == {} and self.executor.allocator.num_used == 0
            assert self.d_sched.placement.homes == {}

    def start_executor(self) -> tuple[ExecutorThread, str]:
        """An attention executor over the shared pool, served by a thread; (its "process", address)."""
        engine = self.engines[2] if len(self.engines) > 2 else None
        self.executor = AttentionExecutor(self.shared, self.net.endpoint(), *self.heads, "torch", engine)
        self.proc = ExecutorThread(self.executor, self.net)
        return self.proc, self.executor.transport.address

    def stop_executor(self) -> None:
        """The executor dies: it stops serving and nothing reaches it."""
        self.proc.terminate()

    def close(self) -> None:
        if self.executor is not None:
            self.stop_executor()
        for mover in (self.prefill.mover, self.decode.mover):
            mover.close()
        if self.exchange is not None:
            self.exchange.close()


class ExecutorThread:
    """An executor's serving thread, seen as its process (``is_alive``, ``exitcode``, ``terminate``)."""

    def __init__(self, executor: AttentionExecutor, net: MemoryNetwork) -> None:
        self.executor, self.net = executor, net
        self._serving = threading.Event()
        self._serving.set()
        self._thread = threading.Thread(target=executor.serve, args=(self._serving.is_set,), daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def exitcode(self) -> int | None:
        return None if self.is_alive() else -9

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def terminate(self) -> None:
        self._serving.clear()
        self._thread.join(10)
        self.net.cut(self.executor.transport.address)


class RouterPair:
    """A prefill and a decode instance (``prefill_args``/``decode_args`` added to their roles)
    behind SGLang's router at ``url``; ``restart`` runs an instance's command again on the same
    ports, as an operator restarting a dead instance would."""

    def __init__(
        self,
        tmp: Path,
        prefill_args: Sequence[str] = (),
        decode_args: Sequence[str] = (),
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.tmp, self.startup_timeout_s = tmp, startup_timeout_s
        self.bootstrap_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = {
            "prefill": ["--disaggregation-bootstrap-port", str(self.bootstrap_port), *prefill_args],
            "decode": list(decode_args),
        }
        self.ports = {role: free_port() for role in self.args}
        self.incarnations = dict.fromkeys(self.args, 0)
        self.prefill, self.decode = self._start("prefill"), self._start("decode")
        self.router = launch_pd.Cluster(str(tmp))

    def _start(self, role: str) -> Server:
        name = f"{role}{self.incarnations[role]}"
        (self.tmp / name).mkdir()
        return Server(
            self.tmp / name, "--disaggregation-mode", role, *self.args[role], port=self.ports[role],
            threads=1, startup_timeout_s=self.startup_timeout_s,
        )  # fmt: skip

    def start(self) -> None:
        """Wait for both instances, then start the router and wait until it serves."""
        for srv in (self.prefill, self.decode):
            srv.wait_ready()
        prefills = [(self.prefill.url, self.bootstrap_port)]
        self.router.start(
            "router", launch_pd.router_command("127.0.0.1", self.port, prefills, [self.decode.url])
        )
        launch_pd.wait_serving(self.router, self.url, timeout_s=self.startup_timeout_s)

    def restart(self, role: str) -> None:
        """kill -9 of the whole instance (if still alive), then the same command again, ready."""
        old: Server = getattr(self, role)
        for p in old.tree():
            p.kill()
        old.stop(timeout=30)
        self.incarnations[role] += 1
        new = self._start(role)
        setattr(self, role, new)
        new.wait_ready()

    def stop(self) -> None:
        self.router.stop()
        for srv in (self.prefill, self.decode):
            srv.stop()
