"""Decode side of PD: a routed request queues in the scheduler like any other; when the scheduler
admits it (its one admission, with the same running cap and KV headroom), its pages are reserved
and the prefill instance is asked for the prompt's KV and first token; then it decodes.

The prefill instance is found through its bootstrap server (``PrefillDirectory``, which notices a
restarted prefill instance by its new address). A request whose KV does not arrive within
``timeout_s`` ends with HTTP 504 and frees its pages; one whose KV was lost with a restarted
prefill instance ends with HTTP 502 as soon as the new incarnation registers. While a
request waits in the queue, keepalives tell its prefill instance (which holds its KV) to wait.

Over a one-sided mover (Mooncake) the prefill side writes into the reserved pages itself: landed
notices count the pages, and the first token (``KVDone``, on the control plane) waits for them. A
transfer this side ends keeps its pages out of use until the prefill side fences them (or
``timeout_s`` passes), so a late write never lands in another request's KV.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from adrenaline.core.request import Req, finish_abort
from adrenaline.disaggregation.common import TransferManager, bootstrap_of
from adrenaline.disaggregation.peers import PrefillDirectory, Restart
from adrenaline.disaggregation.protocol import (
    PD,
    PD_VERSION,
    KVAck,
    KVAlive,
    KVCancel,
    KVDone,
    KVPages,
    KVRequest,
)
from adrenaline.offload.protocol import LoadReport
from adrenaline.transport.base import Message, TransportError
from adrenaline.transport.kv_pages import scatter_pages

logger = logging.getLogger(__name__)


@dataclass
class Inbound:
    req: Req
    room: int
    bootstrap: tuple[str, int]
    deadline: float
    peer: str | None = None  # the prefill instance's transport address, once asked for the KV
    received: int = 0  # pages written so far
    last_alive: float = 0.0  # when the prefill side last heard we still want it (while queued)
    asked: float = 0.0  # when the KV was asked for
    done: KVDone | None = None  # the first token, once it came (one-sided: maybe before the pages)


class DecodeTransfers(TransferManager):
    role = "decode"

    def __init__(
        self,
        *args,
        directory: PrefillDirectory | None = None,
        loads: Callable[[Req, LoadReport], None] | None = None,
        **kwargs,
    ) -> None:
        """``loads``: hears each prefill instance's load report (an offloading decode instance)."""
        super().__init__(*args, **kwargs)
        self.loads = loads
        self.inbound: dict[int, Inbound] = {}  # bootstrap room -> queued or KV on its way
        self.directory = directory or PrefillDirectory()
        self.fences: dict[int, tuple[list[int], float]] = {}  # room -> (held pages, until)

    # ---- requests from the front end ----------------------------------------------------------
    def add_request(self, req: Req) -> None:
        boot = bootstrap_of(req)
        if boot is None:
            self.scheduler.add_request(req)
            return
        host, port, room = boot
        if room in self.inbound:
            raise ValueError(f"bootstrap_room {room} is already in use on this decode instance")
        try:
            self.scheduler.validate(req)
        except ValueError as e:  # the client hears it now; its prefill instance must not wait for us
            self._refused(boot[:2], room, f"refused by the decode instance: {e}")
            raise
        # Prompt logprobs are the prefill instance's: SGLang's router merges them into the reply.
        req.logprob_start_len = -1
        self.scheduler.add_request(req)
        if req.finished:  # max_new_tokens == 0: nothing to decode
            self.emit(req)
            return
        self.inbound[room] = Inbound(req, room, (host, port), time.monotonic() + self.timeout_s)

    def _refused(self, bootstrap: tuple[str, int], room: int, text: str) -> None:
        """Tell a prefill instance that the room it is (or will be) prefilling has no decode side."""
        try:
            peer = self.directory.cached(bootstrap) or self.directory.address(bootstrap)
            PD.send(self.transport, peer, KVCancel(room, text))
        except (OSError, TransportError) as e:
            logger.warning("room %s: prefill instance not told of the refusal: %s", room, e)

    def requests(self) -> list[Req]:
        return [t.req for t in self.inbound.values()]

    def abort(self, rid: str, reason: dict) -> list[Req]:
        hit = [t for t in self.inbound.values() if t.req.rid == rid]
        for t in hit:
            self._end(t, reason, tell_peer=f"aborted on the decode instance: {reason.get('message')}")
        return [t.req for t in hit]

    # ---- the scheduler's hooks ----------------------------------------------------------------
    def _inbound(self, req: Req) -> Inbound | None:
        t = self.inbound.get(req.bootstrap.room)
        return t if t is not None and t.req is req else None

    def prefilled_elsewhere(self, req: Req) -> bool:
        return self._inbound(req) is not None

    def on_admitted(self, req: Req) -> None:
        """Ask the prefill side for the KV, into ``req.pages`` (or kept there when placed remotely)."""
        t = self._inbound(req)
        try:
            t.peer = self.directory.address(t.bootstrap)
        except OSError as e:
            self._fail(t, finish_abort(f"prefill instance not reachable: {e}", 502))
            return
        self._ask(t)

    def _ask(self, t: Inbound) -> None:
        req = t.req
        t.asked = time.monotonic()
        t.deadline = t.asked + self.timeout_s
        t.received = 0
        offload = not self.scheduler.placement.is_local(req)
        future = len(req.input_ids) + req.params.max_new_tokens
        target = self.mover.target()
        msg = KVRequest(PD_VERSION, t.room, req.rid, list(req.pages), self.layout, offload, future, target)
        try:
            PD.send(self.transport, t.peer, msg)
        except TransportError as e:
            self._fail(t, finish_abort(f"prefill instance not reachable: {e}", 502))

    def _restarted(self, r: Restart) -> None:
        """A prefill instance came back: what its old incarnation held is gone with it.

        A transfer asked for after the old one last answered may be for the new one: ask it again.
        """
        host, port = r.bootstrap
        logger.warning("prefill instance at bootstrap %s:%d restarted: %s -> %s", host, port, r.old, r.new)
        for t in [t for t in self.inbound.values() if t.peer == r.old]:
            if t.asked > r.old_seen and t.received == 0:
                t.peer = r.new
                self._ask(t)
            else:
                text = f"the prefill instance (bootstrap {host}:{port}) restarted and lost this request's KV"
                self._fail(t, finish_abort(text, 502), tell_peer=text)

    # ---- messages from prefill instances ------------------------------------------------------
    def handle(self, msg: Message) -> None:
        m = PD.parse(msg)
        t = self.inbound.get(m.room) if m is not None else None
        if t is None or t.peer != msg.peer:
            logger.debug("%s for no transfer of ours from %s dropped", msg.kind, msg.peer)
            return
        t.deadline = time.monotonic() + self.timeout_s  # the peer is alive
        if isinstance(m, KVPages):
            data = msg.tensors[0]
            scatter_pages(self.pool, t.req.pages[m.first : m.first + data.shape[2]], data)
            t.received = max(t.received, m.first + data.shape[2])
            self.stats.kv_bytes += data.numel() * data.element_size()
        elif isinstance(m, KVDone):
            t.done = m
            self._take_landed()  # one-sided pages: their notices may still be unread
            self._done(t)
        elif isinstance(m, KVCancel) and m.retry_local and not self.scheduler.placement.is_local(t.req):
            t.peer = None  # no executor room there: take its KV here after all
            self.scheduler.requeue_local(t.req)
        elif isinstance(m, KVCancel):
            self._fail(t, finish_abort(f"prefill instance: {m.message}", 502))

    def _take_landed(self) -> None:
        """Count the pages a one-sided mover reports landed; release the pages of fenced rooms."""
        for room, pages in self.mover.landed():
            t = self.inbound.get(room)
            if t is not None and t.peer is not None:
                t.received = max(t.received, pages)
                t.deadline = time.monotonic() + self.timeout_s
                self._done(t)
        for room in self.mover.fenced():
            self._unfence(room)

    def _unfence(self, room: int) -> None:
        pages, _ = self.fences.pop(room, ([], 0.0))
        if pages:
            self.scheduler.drop_pages(pages)

    def tick(self) -> None:
        self._take_landed()
        super().tick()

    def info(self) -> dict:
        return {**super().info(), "fenced_rooms": len(self.fences)}

    def _done(self, t: Inbound) -> None:
        """Admit the request once both its first token and all its pages are in."""
        m, pages = t.done, len(t.req.pages)
        if m is None or self.inbound.get(t.room) is not t:
            return
        if t.received < pages and self.mover.one_sided:
            return  # the landed notices are on their way, or the deadline ends it
        if t.received < pages:
            text = f"prefill finished with {t.received} of {pages} KV pages sent"
            self._fail(t, finish_abort(text, 500), tell_peer=text)
            return
        del self.inbound[t.room]
        PD.send(self.transport, t.peer, KVAck(t.room))
        self.stats.transfers += 1
        self.stats.pages += pages
        if self.loads is not None and m.load is not None:
            self.loads(t.req, m.load)
        self.scheduler.admit_prefilled(t.req, m.token, m.logprob, m.top, m.executor)
        self.emit(t.req)

    # ---- endings ------------------------------------------------------------------------------
    def _fail(self, t: Inbound, reason: dict, tell_peer: str | None = None) -> None:
        self._end(t, reason, tell_peer)
        self.stats.failures += 1
        self.emit(t.req)

    def _end(self, t: Inbound, reason: dict, tell_peer: str | None = None) -> None:
        """Forget a transfer, end its request with ``reason`` (the scheduler frees its pages; those
        a one-sided writer may still hit are held until it fences them)."""
        self.inbound.pop(t.room, None)
        if tell_peer and t.peer is not None and self.mover.one_sided and t.req.pages:
            self.scheduler.hold_pages(list(t.req.pages))
            self.fences[t.room] = (list(t.req.pages), time.monotonic() + self.timeout_s)
        # a request still queued here has not asked yet, but its prefill instance holds its KV
        peer = t.peer if t.peer is not None else self.directory.cached(t.bootstrap)
        if tell_peer and peer is not None:
            try:
                PD.send(self.transport, peer, KVCancel(t.room, tell_peer))
            except TransportError:
                pass
        if not self.scheduler.abort(t.req.rid, reason):
            t.req.finished_reason = dict(reason)

    def expire(self) -> None:
        """Fail transfers whose prefill side went quiet; keep the prefill side of queued ones waiting.

        A request queued here for KV room waits as long as it takes (like any queued request);
        keepalives tell its prefill instance, which holds its KV meanwhile, that it is wanted.
        """
        for r in self.directory.restarts():
            self._restarted(r)
        now = time.monotonic()
        for room in [room for room, (_, until) in self.fences.items() if until < now]:
            self._unfence(room)  # its writer is gone or frozen past its own write timeout
        for t in self.inbound.values():
            if t.peer is None and now - t.last_alive > self.timeout_s / 3:
                t.last_alive = now
                try:
                    PD.send(self.transport, self.directory.address(t.bootstrap), KVAlive(t.room))
                except (OSError, TransportError):
                    pass  # unreachable now: its deadline there ends it, or admission finds out
        for t in [t for t in self.inbound.values() if t.peer is not None and t.deadline < now]:
            host, port = t.bootstrap
            text = f"no KV from the prefill instance (bootstrap {host}:{port}) within {self.timeout_s:g} s"
            logger.warning("%s: request %s failed", text, t.req.rid)
            self._fail(t, finish_abort(text, 504), tell_peer=text)
