"""The attention executor: a weightless process beside a prefill instance that owns the KV of
offloaded requests and computes their decode attention for decode instances.

Its KV pool is shared with the prefill scheduler's process (shared memory on CPU, CUDA IPC on
GPU: torch passes the tensors' handles when it starts this process), so a prefill writes an
offloaded prompt's KV in place and no KV crosses the network. Per decode step it gets, from each
decode instance, the step's rooms and lengths (growing their pages here), then per layer the
packed q|k|v; it appends k and v to the pool and answers with the attention output. It serves any
number of decode instances, one attention backend (plan) per instance. A decode instance on this
host may move its steps and layers onto a shared-memory channel (``ShmOffer``): ``ShmServer`` then
serves it on its own thread (``_shm_begin`` / ``_shm_attend``), under the server's lock wherever
pages change, while ZeroMQ keeps the control messages. One on another host may move them onto the
Mooncake Transfer Engine (``MooncakeOffer``), served the same way by ``MooncakeService``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adrenaline.attention import create_backend
from adrenaline.attention.base import AttentionBackend
from adrenaline.core.batch import AttentionBatch
from adrenaline.kv_cache.allocator import PageAllocator, num_pages
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.ledger import ExecutorLedger
from adrenaline.offload.load_aware import Reason
from adrenaline.offload.mooncake_serve import MooncakeService
from adrenaline.offload.protocol import (
    OFFLOAD,
    AttnError,
    AttnFree,
    AttnOut,
    AttnQKV,
    AttnStep,
    ExecAlloc,
    ExecAllocReply,
    ExecFree,
    ExecStatsAsk,
    ExecStatsReply,
    ExecutorStats,
    MooncakeOffer,
    MooncakeOfferReply,
    ShmOffer,
    ShmOfferReply,
)
from adrenaline.transport.base import Message, Transport, TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.protocol import Mismatch
from adrenaline.transport.shm_exchange import StepMeta
from adrenaline.transport.shm_server import ShmServer

logger = logging.getLogger(__name__)

# A room no step touched for this long belongs to a decode instance that died or forgot it.
# Rooms a decode instance has stepped are freed as soon as it is seen gone (``_reclaim``).
ROOM_IDLE_S = 600.0


@dataclass
class _Step:
    step: int
    backend: AttentionBackend | None  # None: the step could not be planned
    error: str = ""


class AttentionExecutor:
    def __init__(
        self,
        pool: KVPool,
        transport: Transport,
        num_heads: int,
        num_kv_heads: int,
        backend: str,
        mooncake: MooncakeEngine | None = None,
    ) -> None:
        """``mooncake``: an engine to serve decode instances' Mooncake links on (None: refuse them)."""
        self.pool = pool
        self.transport = transport
        self.heads = (num_heads, num_kv_heads, pool.k[0].shape[-1])
        self.backend_name = backend
        self.allocator = PageAllocator(pool.num_pages, pool.page_size, enable_prefix_caching=False)
        self.pages: dict[int, list[int]] = {}  # bootstrap room -> its pages in the pool
        self.touched: dict[int, float] = {}  # bootstrap room -> when a step or alloc last used it
        self.owner: dict[int, str] = {}  # bootstrap room -> the decode peer that steps it
        self.ledger = ExecutorLedger(pool.num_slots)  # future KV promised, per decode peer
        self.steps: dict[str, _Step] = {}  # decode peer -> its current step
        self.backends: dict[str, AttentionBackend] = {}
        self.layers_served = 0
        self.shm = ShmServer(self._shm_attend, self._shm_begin, self._shm_closed, device=pool.device)
        self.mooncake = None
        if mooncake is not None:
            args = (self.heads, pool.dtype, pool.device, self._shm_begin, self._shm_attend, self.shm.lock)
            self.mooncake = MooncakeService(mooncake, *args)
        create_backend(backend, pool, num_heads, num_kv_heads, self.heads[2])  # build its kernels now

    # ---- requests' pages ------------------------------------------------------------------------
    def _grow(self, room: int, tokens: int) -> list[int]:
        pages = self.pages.setdefault(room, [])
        self.touched[room] = time.monotonic()
        need = num_pages(tokens, self.pool.page_size) - len(pages)
        if need > self.allocator.num_available:
            raise MemoryError(
                f"executor KV pool full ({self.allocator.num_available} pages free, {need} needed)"
            )
        if need > 0:
            pages.extend(self.allocator.alloc(need))
        return pages

    def _free(self, rooms: list[int]) -> None:
        for room in rooms:
            self.ledger.release(room)
            self.touched.pop(room, None)
            self.owner.pop(room, None)
            pages = self.pages.pop(room, None)
            if pages:
                self.allocator.free(pages)

    def stats(self) -> ExecutorStats:
        a = self.allocator
        led = self.ledger
        return ExecutorStats(
            len(self.pages),
            a.num_used,
            a.num_pages,
            self.layers_served,
            sorted(self.backends),
            led.capacity,
            led.reserve,
            {c: t for c, t in led.by_client.items() if t > 0},
            {r.value: n for r, n in led.counts.items() if r is not Reason.OK},
        )

    # ---- messages -------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        m = OFFLOAD.parse(msg)
        if isinstance(m, AttnStep):
            self._free(m.frees)
            self.steps[msg.peer] = self._plan(msg.peer, m.step, m.rooms, m.seq_lens)
        elif isinstance(m, AttnQKV):
            self._attend(msg.peer, m, msg.tensors[0])
        elif isinstance(m, (AttnFree, ExecFree)):
            self._free(m.rooms)
        elif isinstance(m, ExecAlloc):
            self._alloc(msg.peer, m)
        elif isinstance(m, ShmOffer):
            self._attach(msg.peer, m)
        elif isinstance(m, MooncakeOffer):
            self._attach_mooncake(msg.peer, m)
        elif isinstance(m, ExecStatsAsk):
            OFFLOAD.send(self.transport, msg.peer, ExecStatsReply(m.ask, self.stats()))
        elif isinstance(m, Mismatch):
            self._refuse(msg.peer, m)
        else:
            logger.warning("unexpected message %s from %s dropped", msg.kind, msg.peer)

    def _refuse(self, peer: str, m: Mismatch) -> None:
        """Answer a peer speaking another protocol version with the error, where it waits for one."""
        logger.error(m.error)
        if m.kind == AttnStep.__name__:
            self.steps[peer] = _Step(m.meta.get("step", -1), None, m.error)
        elif m.kind == ShmOffer.__name__:
            OFFLOAD.send(self.transport, peer, ShmOfferReply(m.error))
        elif m.kind == MooncakeOffer.__name__:
            OFFLOAD.send(self.transport, peer, MooncakeOfferReply(None, m.error))
        elif m.kind == ExecAlloc.__name__:
            reply = ExecAllocReply(m.meta.get("ask", -1), m.meta.get("room", -1), self.stats(), None, m.error)
            OFFLOAD.send(self.transport, peer, reply)

    def _alloc(self, peer: str, m: ExecAlloc) -> None:
        """Pages for an offloaded prompt, once the ledger holds room for its whole future KV."""
        pages, error = None, None
        future = max(m.future_tokens, m.tokens)
        reason = self.ledger.admit(m.client or peer, m.room, future)
        try:
            if reason is not Reason.OK:
                raise MemoryError(f"{reason.value}: no room for {future} future KV tokens of {m.client}")
            pages = self._grow(m.room, m.tokens)
        except MemoryError as e:
            self._free([m.room])
            error = str(e)
        OFFLOAD.send(self.transport, peer, ExecAllocReply(m.ask, m.room, self.stats(), pages, error))

    def _plan(self, peer: str, step: int, rooms: list[int], seq_lens: list[int]) -> _Step:
        unknown = [r for r in rooms if r not in self.pages]
        if unknown:
            return _Step(step, None, f"unknown bootstrap rooms {unknown[:3]}: their KV is not here")
        self.owner.update(dict.fromkeys(rooms, peer))
        try:
            tables = [self._grow(r, n) for r, n in zip(rooms, seq_lens)]
        except MemoryError as e:
            return _Step(step, None, str(e))
        ps = self.pool.page_size
        slots = [t[(n - 1) // ps] * ps + (n - 1) % ps for t, n in zip(tables, seq_lens)]
        batch = AttentionBatch(
            extend_lens=[1] * len(rooms),
            seq_lens=list(seq_lens),
            page_table=tables,
            out_slots=torch.tensor(slots, dtype=torch.long, device=self.pool.device),
        )
        backend = self.backends.get(peer)
        if backend is None:
            backend = self.backends[peer] = create_backend(self.backend_name, self.pool, *self.heads)
        backend.plan(batch)
        return _Step(step, backend)

    def _attend(self, peer: str, m: AttnQKV, qkv: torch.Tensor) -> None:
        plan = self.steps.get(peer)
        if plan is None or plan.step != m.step or plan.backend is None:
            error = (
                plan.error if plan is not None and plan.step == m.step else f"step {m.step} was not announced"
            )
            OFFLOAD.send(self.transport, peer, AttnError(m.step, m.layer, error))
            return
        h, hkv, _ = self.heads
        tic = time.perf_counter()
        q, k, v = qkv.to(self.pool.device).split([h, hkv, hkv], dim=1)
        out = plan.backend.forward(m.layer, q, k, v)
        attend_us = round((time.perf_counter() - tic) * 1e6)
        self.layers_served += 1
        a = self.allocator
        OFFLOAD.send(
            self.transport, peer, AttnOut(m.step, m.layer, a.num_used, a.num_pages, attend_us), [out]
        )

    # ---- the shared-memory fast path ------------------------------------------------------------
    def _attach(self, peer: str, m: ShmOffer) -> None:
        """Serve ``peer``'s channel if it is on this host and its layout fits; answer either way."""
        error = None
        try:
            self.shm.add(f"shm:{peer}", m.offer, self.heads)
        except (TransportError, KeyError, TypeError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        OFFLOAD.send(self.transport, peer, ShmOfferReply(error))

    def _attach_mooncake(self, peer: str, m: MooncakeOffer) -> None:
        reply = MooncakeOfferReply(None, "this attention executor runs without Mooncake")
        if self.mooncake is not None:
            try:
                reply = MooncakeOfferReply(self.mooncake.attach(m.endpoint))
            except TransportError as e:
                reply = MooncakeOfferReply(None, f"{type(e).__name__}: {e}")
        OFFLOAD.send(self.transport, peer, reply)

    def _shm_begin(self, meta: StepMeta) -> tuple[int, int]:
        self._free(meta.frees)
        if meta.rooms:
            self.steps[meta.peer] = self._plan(meta.peer, meta.step, meta.rooms, meta.seq_lens)
        return self.allocator.num_used, self.allocator.num_pages

    def _shm_attend(
        self, meta: StepMeta, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        plan = self.steps.get(meta.peer)
        if plan is None or plan.backend is None:
            raise RuntimeError(plan.error if plan is not None else f"step {meta.step} was not planned")
        out = plan.backend.forward(layer, q, k, v)
        self.layers_served += 1
        return out

    def _shm_closed(self, peer: str) -> None:
        with self.shm.lock:
            self._reclaim(peer)

    def _reclaim(self, peer: str) -> None:
        """A decode peer is gone (its channel closed, its connection dropped): free its rooms."""
        self.steps.pop(peer, None)
        self.backends.pop(peer, None)
        rooms = [r for r, p in self.owner.items() if p == peer]
        if rooms:
            logger.warning("decode peer %s is gone: freeing its %d rooms", peer, len(rooms))
            self._free(rooms)

    def serve(self, alive: Callable[[], bool]) -> None:
        """Serve until ``alive()`` (checked every second) turns false."""
        checked = time.monotonic()
        while True:
            msg = self.transport.poll(0.1)
            if msg is not None:
                with self.shm.lock:  # shared-memory peers change pages on their own threads
                    self.handle(msg)
            if time.monotonic() - checked > 1:
                checked = time.monotonic()
                if not alive():
                    self.shm.close()
                    if self.mooncake is not None:
                        self.mooncake.close()
                    return
                with self.shm.lock:
                    self._housekeeping(checked)

    def _housekeeping(self, now: float) -> None:
        """Once a second: free the rooms of TCP peers whose connection dropped, and idle rooms."""
        for peer in {p for p in self.owner.values() if not p.startswith("shm:")}:
            if self.transport.lost(peer):
                self._reclaim(peer)
        idle = [r for r, t in self.touched.items() if now - t > ROOM_IDLE_S]
        if idle:
            logger.warning("freeing %d rooms idle for %.0f s", len(idle), ROOM_IDLE_S)
            self._free(idle)
