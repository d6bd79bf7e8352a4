"""Decode side of PD: pre-allocate a routed request's KV pages, receive them and its first token
from the prefill instance, then decode it like any other request.

Admission is FIFO under the running cap and the free pages. The prefill instance is found through
its bootstrap server (cached per bootstrap address) and told which pages to fill. A request whose
KV does not arrive within ``timeout_s`` ends with HTTP 504 and frees its pages; the cached
address of that prefill instance is dropped, so a restarted one is found again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adrenaline.disaggregation.bootstrap import lookup_prefill
from adrenaline.disaggregation.common import (
    KV_ACK,
    KV_ALIVE,
    KV_CANCEL,
    KV_DONE,
    KV_PAGES,
    KV_REQUEST,
    TransferManager,
    bootstrap_of,
    num_pages,
    scatter_pages,
)
from adrenaline.offload.policy import OffloadPolicy
from adrenaline.scheduler.request import Req, finish_abort, finish_length
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.transport.base import Message, Transport, TransportError

logger = logging.getLogger(__name__)


@dataclass
class Inbound:
    req: Req
    room: int
    bootstrap: tuple[str, int]
    deadline: float
    peer: str | None = None  # the prefill instance's transport address
    pages: list[int] = field(default_factory=list)
    received: int = 0  # pages written so far
    offload: bool = False  # its KV stays in the prefill side's attention executor
    may_offload: bool = True  # False once the prefill side could not take it
    last_alive: float = 0.0  # when the prefill side last heard we still want it (while pending)


class DecodeTransfers(TransferManager):
    role = "decode"

    def __init__(
        self,
        scheduler: Scheduler,
        transport: Transport,
        timeout_s: float,
        emit: Callable[[Req], None],
        policy: OffloadPolicy | None = None,
    ) -> None:
        """``policy`` decides which admitted requests offload their attention (None: none do)."""
        super().__init__(scheduler, transport, timeout_s, emit)
        self.policy = policy
        self.pending: deque[Inbound] = deque()  # waiting for pages here
        self.inflight: dict[int, Inbound] = {}  # asked the prefill side, KV on its way
        self.addresses: dict[tuple[str, int], str] = {}

    # ---- requests from the front end ----------------------------------------------------------
    def add_request(self, req: Req) -> None:
        boot = bootstrap_of(req)
        if boot is None:
            self.scheduler.add_request(req)
            return
        host, port, room = boot
        if room in self.inflight or any(t.room == room for t in self.pending):
            raise ValueError(f"bootstrap_room {room} is already in use on this decode instance")
        self.scheduler.prepare(req)
        # Prompt logprobs are the prefill instance's: SGLang's router merges them into the reply.
        req.logprob_start_len = -1
        if req.params.max_new_tokens == 0:
            req.finished_reason = finish_length(0)
            self.emit(req)
            return
        self.pending.append(Inbound(req, room, (host, port), time.monotonic() + self.timeout_s))

    def requests(self) -> list[Req]:
        return [t.req for t in [*self.pending, *self.inflight.values()]]

    def abort(self, rid: str, reason: dict) -> list[Req]:
        hit = [t for t in [*self.pending, *self.inflight.values()] if t.req.rid == rid]
        for t in hit:
            self._end(t, reason, tell_peer=f"aborted on the decode instance: {reason.get('message')}")
        return [t.req for t in hit]

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.inflight)

    def tick(self) -> None:
        super().tick()
        self.admit()
        if self.scheduler.remote is not None:
            self.scheduler.remote.flush()

    def info(self) -> dict:
        info = super().info()
        remote = self.scheduler.remote
        if remote is not None:
            local, offloaded = self._counts()
            info["offload"] = {
                "local_requests": local,
                "offloaded_requests": offloaded,
                "offloaded_steps": remote.steps,
                "fallbacks": self.scheduler.stats.offload_fallbacks,
                "executors": remote.executor_kv,  # each executor's last reported KV usage
            }
        return info

    def _counts(self) -> tuple[int, int]:
        """(local, offloaded) requests running or on their way here."""
        offloaded = sum(r.offload is not None for r in self.scheduler.running)
        offloaded += sum(t.offload for t in self.inflight.values())
        return len(self.scheduler.running) + len(self.inflight) - offloaded, offloaded

    # ---- admission ----------------------------------------------------------------------------
    def admit(self) -> None:
        """Allocate pages and ask the prefill side, oldest first, while room remains."""
        s = self.scheduler
        while self.pending and len(s.running) + len(self.inflight) < s.config.max_running_requests:
            t = self.pending[0]
            t.offload = t.may_offload and self.policy is not None and self.policy.offload(*self._counts())
            need = 0 if t.offload else num_pages(len(t.req.input_ids), self.page_size)
            if need > s.allocator.num_available:
                return
            if need and (s.running or self.inflight) and (s.waiting or not self._has_room(t)):
                return  # retracted requests go first; running ones keep room to grow
            self.pending.popleft()
            try:
                t.peer = self._address(t.bootstrap)
            except OSError as e:
                self._fail(t, finish_abort(f"prefill instance not reachable: {e}", 502))
                continue
            t.pages = s.allocator.alloc(need)
            t.deadline = time.monotonic() + self.timeout_s
            self.inflight[t.room] = t
            meta = {
                "room": t.room,
                "rid": t.req.rid,
                "pages": t.pages,
                "layout": self.layout,
                "offload": t.offload,
            }
            try:
                self.transport.send(t.peer, KV_REQUEST, meta)
            except TransportError as e:
                self._fail(t, finish_abort(f"prefill instance not reachable: {e}", 502))

    def _has_room(self, t: Inbound) -> bool:
        """Room for ``t`` next to the running requests and those whose KV is on its way."""
        s = self.scheduler
        coming = sum(s.headroom.pages(i.req, len(i.pages)) for i in self.inflight.values() if not i.offload)
        return s.has_room(t.req, held=0, extra=coming)

    def _address(self, bootstrap: tuple[str, int]) -> str:
        addr = self.addresses.get(bootstrap)
        if addr is None:
            addr = self.addresses[bootstrap] = lookup_prefill(*bootstrap)
        return addr

    # ---- messages from prefill instances ------------------------------------------------------
    def handle(self, msg: Message) -> None:
        t = self.inflight.get(msg.meta.get("room"))
        if t is None or t.peer != msg.peer:
            logger.debug("%s for unknown bootstrap room from %s dropped", msg.kind, msg.peer)
            return
        t.deadline = time.monotonic() + self.timeout_s  # the peer is alive
        if msg.kind == KV_PAGES:
            first, data = msg.meta["first"], msg.tensors[0]
            scatter_pages(self.pool, t.pages[first : first + data.shape[2]], data)
            t.received = max(t.received, first + data.shape[2])
            self.stats.kv_bytes += data.numel() * data.element_size()
        elif msg.kind == KV_DONE:
            if t.received < len(t.pages):
                text = f"prefill finished with {t.received} of {len(t.pages)} KV pages sent"
                self._fail(t, finish_abort(text, 500), tell_peer=text)
                return
            del self.inflight[t.room]
            self.transport.send(t.peer, KV_ACK, {"room": t.room})
            self.stats.transfers += 1
            self.stats.pages += len(t.pages)
            t.req.pages = t.pages
            if t.offload:
                t.req.offload = msg.meta["executor"]
                t.req.extra["attention_offloaded"] = True
            top = [tuple(x) for x in msg.meta["top"]] if msg.meta.get("top") else msg.meta.get("top")
            self.scheduler.admit_prefilled(t.req, msg.meta["token"], msg.meta.get("logprob"), top)
            self.emit(t.req)
        elif msg.kind == KV_CANCEL and t.offload and msg.meta.get("local_ok"):
            del self.inflight[t.room]  # no executor room there: take its KV here after all
            t.offload = t.may_offload = False
            self.pending.appendleft(t)
        elif msg.kind == KV_CANCEL:
            self._fail(t, finish_abort(f"prefill instance: {msg.meta.get('message')}", 502))

    # ---- endings ------------------------------------------------------------------------------
    def _fail(self, t: Inbound, reason: dict, tell_peer: str | None = None) -> None:
        self._end(t, reason, tell_peer)
        self.stats.failures += 1
        self.emit(t.req)

    def _end(self, t: Inbound, reason: dict, tell_peer: str | None = None) -> None:
        """Forget a transfer, free its pages, finish its request with ``reason``."""
        if t in self.pending:
            self.pending.remove(t)
        self.inflight.pop(t.room, None)
        if t.pages:
            self.scheduler.allocator.free(t.pages)
            t.pages = []
        if tell_peer and t.peer is not None:
            try:
                self.transport.send(t.peer, KV_CANCEL, {"room": t.room, "message": tell_peer})
            except TransportError:
                pass
        t.req.finished_reason = dict(reason)

    def expire(self) -> None:
        """Fail transfers whose prefill side went quiet; keep the prefill side of queued ones waiting.

        A request queued here for KV room waits as long as it takes (like any queued request);
        keepalives tell its prefill instance, which holds its KV meanwhile, that it is wanted.
        """
        now = time.monotonic()
        for t in self.pending:
            if now - t.last_alive > self.timeout_s / 3:
                t.last_alive = now
                try:
                    self.transport.send(self._address(t.bootstrap), KV_ALIVE, {"room": t.room})
                except (OSError, TransportError):
                    pass  # unreachable now: its deadline there ends it, or admission finds out
        for t in [t for t in self.inflight.values() if t.deadline < now]:
            host, port = t.bootstrap
            text = f"no KV from the prefill instance (bootstrap {host}:{port}) within {self.timeout_s:g} s"
            logger.warning("%s: request %s failed", text, t.req.rid)
            self.addresses.pop(t.bootstrap, None)  # it may come back at a new address
            self._fail(t, finish_abort(text, 504), tell_peer=text)
