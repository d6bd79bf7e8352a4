"""Prefill side of PD: compute the prompt, ship its KV pages and first token to the decode side.

A routed request is prefilled like any other, limited to its first token. Its KV pages go to the
decode instance as soon as both are known: the pages the decode side reserved (its ``KVRequest``)
and the pages computed here, chunk by chunk. Pages a finished request no longer needs are held until
they are sent. Its reply (first token, prompt logprobs) leaves with the last of it (the ``KVDone``),
as SGLang's prefill replies once its sender completes: the router forwards the decode side's stream
only after this reply, and the decode side's acknowledgement reaches this loop only between
forwards, up to a whole prefill batch later. A decode side that never asks ends the request with an
error after ``timeout_s``; an acknowledgement that never comes only ends the transfer here (that
decode side has its KV, or times out by itself). Every page is freed either way. Pages move through
a ``KVPageMover``: over the transport, or in place into the colocated attention executor's pool for
an offloaded request (whose page grant arrives later, without blocking the loop). Pages that cannot
be sent end the transfer at the next ``expire``. Over a one-sided mover (Mooncake), a decode side's
cancel is answered with a fence once this side will write no more into its pages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial

from adrenaline.core.batch import ScheduledReq
from adrenaline.core.request import Req, finish_abort
from adrenaline.disaggregation.common import TransferManager, bootstrap_of
from adrenaline.disaggregation.protocol import PD, KVAck, KVAlive, KVCancel, KVDone, KVRequest
from adrenaline.kv_cache.allocator import num_pages
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.load_report import LoadMeter
from adrenaline.transport.base import Message, TransportError
from adrenaline.transport.protocol import Mismatch

logger = logging.getLogger(__name__)


@dataclass
class Outbound:
    req: Req
    room: int
    peer: str | None = None  # the decode instance's transport address, once it asked
    dst_pages: list[int] = field(default_factory=list)
    sent: int = 0  # pages sent so far
    held: list[int] = field(default_factory=list)  # computed, unsent pages held past the request
    prompt_done: bool = False  # the whole prompt's KV is computed
    replied: bool = False  # the KVDone, and with it the reply, left: an ending after it reports nothing
    offload: bool = False  # the KV goes into the attention executor's pool
    deadline: float = float("inf")  # set while waiting on the decode side, not while computing
    last_sent: float = 0.0  # keepalives tell a waiting decode side we are still at it
    error: str | None = None  # pages could not be sent: ``expire`` ends the transfer
    computed_at: float = 0.0  # when the whole prompt's KV was computed (for the handoff time)


class PrefillTransfers(TransferManager):
    role = "prefill"

    def __init__(self, *args, executor: ExecutorLink | None = None, **kwargs) -> None:
        """``executor``: the colocated attention executor (None: requests are never offloaded)."""
        super().__init__(*args, **kwargs)
        self.executor = executor
        self.out: dict[int, Outbound] = {}
        self.early: dict[int, tuple[str, KVRequest, float]] = {}  # asks ahead of their request
        self.ended: dict[int, tuple[str, float]] = {}  # rooms ended before their decode side asked
        self.refused: dict[int, tuple[str, float]] = {}  # rooms a decode side refused before they came
        self.meter = LoadMeter()  # reported to decode instances with each KVDone

    # ---- requests from the front end ----------------------------------------------------------
    def add_request(self, req: Req) -> None:
        """Admit a request; a routed one (bootstrap fields) is prefilled for the decode side."""
        boot = bootstrap_of(req)
        if boot is None or req.params.max_new_tokens == 0:  # local, or nothing to decode
            self.scheduler.add_request(req)
            return
        room = boot[2]
        if room in self.out:
            raise ValueError(f"bootstrap_room {room} is already in use by request {self.out[room].req.rid}")
        req.params.max_new_tokens = 1  # the decode instance generates the rest
        refused = self.refused.pop(room, None)
        if refused is not None:  # its decode side already said no: prefilling it would be for nothing
            req.finished_reason = finish_abort(refused[0], 400)
            self.emit(req)
            return
        self.scheduler.add_request(req)
        t = self.out[room] = Outbound(req, room)
        early = self.early.pop(room, None)
        if early is not None:
            self._ask(t, early[0], early[1])

    def requests(self) -> list[Req]:
        return [t.req for t in self.out.values()]

    def abort(self, rid: str, reason: dict) -> list[Req]:
        hit = [t for t in self.out.values() if t.req.rid == rid and not t.replied]
        out: list[Req] = []
        for t in hit:
            self._cancel_peer(t, f"aborted on the prefill instance: {reason.get('message')}")
            out += self._end(t, reason, failed=False)
        return out

    # ---- the scheduler's hooks ----------------------------------------------------------------
    def on_forward(self, items: list[ScheduledReq]) -> None:
        """Send newly computed full pages; hold the rest of a finished prompt until it can go."""
        for it in items:
            t = self._outbound(it.req)
            if t is None:
                continue
            prompt = len(t.req.input_ids)
            t.prompt_done = it.end >= prompt
            ready = (
                num_pages(prompt, self.page_size) if t.prompt_done else min(it.end, prompt) // self.page_size
            )
            if t.peer is not None:
                self._send_pages(t, t.req.pages[t.sent : ready])
            if t.prompt_done:
                t.computed_at = t.computed_at or time.monotonic()
                t.held = list(t.req.pages[t.sent : ready])
                self.scheduler.hold_pages(t.held)
                t.deadline = time.monotonic() + self.timeout_s

    def after_step(self, progressed: list[Req]) -> list[Req]:
        """The requests to report now: routed ones leave with their ``KVDone`` (``_send_done``)."""
        report = []
        for req in progressed:
            t = self._outbound(req)
            if t is None:
                report.append(req)
            elif req.finished and (not t.prompt_done or req.finished_reason["type"] == "abort"):
                self._cancel_peer(t, req.finished_reason.get("message", "prefill failed"))
                report += self._end(t, req.finished_reason, failed=True)
            elif req.finished:
                self.meter.prefilled((req.first_token_time or time.monotonic()) - req.arrival)
                self._send_done(t)
        return report

    def _outbound(self, req: Req) -> Outbound | None:
        t = self.out.get(req.bootstrap.room)
        return t if t is not None and t.req is req else None

    # ---- messages from decode instances -------------------------------------------------------
    def handle(self, msg: Message) -> None:
        if self.executor is not None and self.executor.handle(msg):
            return
        m = PD.parse(msg)
        if isinstance(m, Mismatch):
            if m.kind == KVRequest.__name__:
                self._refuse(msg.peer, m.meta.get("room", -1), m.error)
            return
        t = self.out.get(m.room) if m is not None else None
        if isinstance(m, KVRequest):
            error = self._accept(msg.peer, m)
            if error is not None:
                self._refuse(msg.peer, m.room, error)
            elif t is None and m.room in self.ended:
                self._refuse(msg.peer, m.room, self.ended.pop(m.room)[0])
            elif t is None:
                self.early[m.room] = (msg.peer, m, time.monotonic() + self.timeout_s)
            else:
                self._ask(t, msg.peer, m)
        elif isinstance(m, KVAlive):  # a decode side queued for room still wants this KV
            if t is not None and t.peer is None:
                t.deadline = time.monotonic() + self.timeout_s
        elif isinstance(m, KVCancel):
            self._cancelled(msg.peer, m, t)
        elif t is None or t.peer != msg.peer:
            logger.debug("%s for no transfer of ours from %s dropped", msg.kind, msg.peer)
        elif isinstance(m, KVAck):
            self.stats.transfers += 1
            self.stats.handoff_s += time.monotonic() - t.computed_at
            del self.out[m.room]

    def _accept(self, peer: str, m: KVRequest) -> str | None:
        """Why a decode side's ask cannot be served (None: it can; its data plane is connected)."""
        if m.layout != self.layout:
            return f"KV layout mismatch: prefill {self.layout}, decode {m.layout}"
        try:
            self.mover.connect(peer, m.target)
        except TransportError as e:
            return str(e)
        return None

    def _cancelled(self, peer: str, m: KVCancel, t: Outbound | None) -> None:
        """The decode side ended the room: stop, then fence its pages (no write of ours follows)."""
        if t is not None and t.peer in (None, peer):  # None: it was still queued there, unasked
            t.peer = None  # it asked us to stop: no cancel back
            self._fail(t, f"the decode instance cancelled the transfer: {m.message}", 502)
        elif self.early.get(m.room, ("",))[0] == peer:
            del self.early[m.room]
        elif t is None:  # ahead of its request (the decode side refused it at once): end it on arrival
            self.refused[m.room] = (m.message, time.monotonic() + self.timeout_s)
        try:
            self.mover.fence(peer, m.room)
        except TransportError as e:
            logger.warning("room %s not fenced at %s: %s", m.room, peer, e)

    def _refuse(self, peer: str, room: int, text: str) -> None:
        """A decode side's ask we cannot serve: tell it why, end our side of the room too."""
        logger.error("room %s: %s", room, text)
        PD.send(self.transport, peer, KVCancel(room, text))
        t = self.out.get(room)
        if t is not None:
            self._fail(t, text, 500)

    def _ask(self, t: Outbound, peer: str, m: KVRequest) -> None:
        """The decode side asked for ``t``'s KV: into its pages, or our executor's when offloaded."""
        if not m.offload:
            self._attach(t, peer, m.pages)
        elif self.executor is None:
            self._refuse_offload(t, peer)
        else:
            granted = partial(self._granted, t, peer)
            self.executor.reserve(t.room, len(t.req.input_ids), granted, m.future_tokens, peer)

    def _granted(self, t: Outbound, peer: str, pages: list[int] | None) -> None:
        if self.out.get(t.room) is not t:  # ended while the executor was asked
            if pages is not None:
                self.executor.free([t.room])
        elif pages is None:
            self._refuse_offload(t, peer)
        else:
            t.offload = True
            self._attach(t, peer, pages)

    def _refuse_offload(self, t: Outbound, peer: str) -> None:
        text = "this prefill instance's attention executor cannot take the request"
        PD.send(self.transport, peer, KVCancel(t.room, text, retry_local=True))

    def _attach(self, t: Outbound, peer: str, pages: list[int]) -> None:
        need = num_pages(len(t.req.input_ids), self.page_size)
        t.peer, t.dst_pages = peer, list(pages)
        if len(t.dst_pages) != need:
            text = f"decode allocated {len(t.dst_pages)} pages for a {need}-page prompt"
            self._cancel_peer(t, text)
            self._fail(t, text, 500)
            return
        if t.prompt_done:
            t.deadline = time.monotonic() + self.timeout_s  # for its acknowledgement
            self._send_pages(t, t.held)
            self._release_held(t)  # copied out: the pool's copy is no longer needed
        elif t.sent < len(t.req.pages):  # earlier chunks, computed before the decode side asked
            ready = min(t.req.num_computed, len(t.req.input_ids)) // self.page_size
            self._send_pages(t, t.req.pages[t.sent : ready])
        if t.req.finished:
            self._send_done(t)

    # ---- sending ------------------------------------------------------------------------------
    def _send_pages(self, t: Outbound, pages: list[int]) -> None:
        if not pages or t.error is not None:
            return
        first = t.sent
        mover = self.executor.mover if t.offload else self.mover
        start = time.perf_counter()
        try:
            self.stats.kv_bytes += mover.move(
                t.peer, t.room, first, pages, t.dst_pages[first : first + len(pages)]
            )
        except TransportError as e:
            t.error = f"KV pages of bootstrap room {t.room} not sent: {e}"
            return  # ``expire`` ends it, outside the scheduler's step
        finally:
            self.stats.kv_send_s += time.perf_counter() - start
        if not t.offload:
            t.last_sent = time.monotonic()
        t.sent += len(pages)
        self.stats.pages += len(pages)

    def _send_done(self, t: Outbound) -> None:
        if t.peer is None or t.replied or t.sent < len(t.dst_pages):
            return
        req = t.req
        msg = KVDone(
            t.room,
            req.output_ids[0],
            req.output_logprobs[0] if req.output_logprobs else None,
            req.output_top_logprobs[0] if req.output_top_logprobs else None,
            self.executor.address if t.offload else None,
            self.meter.report(self.executor and self.executor.live_stats, t.peer, self.page_size),
        )
        try:
            self._send(t, msg)
        except TransportError as e:
            logger.warning("first token of room %s not sent: %s", t.room, e)
            return
        t.replied = True
        self.emit(t.req)

    def _send(self, t: Outbound, msg) -> None:
        PD.send(self.transport, t.peer, msg)
        t.last_sent = time.monotonic()

    def info(self) -> dict:
        info = super().info()
        if self.executor is not None:
            info["executor"] = self.executor.info()
        return info

    def _cancel_peer(self, t: Outbound, message: str) -> None:
        if t.peer is not None:
            try:
                PD.send(self.transport, t.peer, KVCancel(t.room, message))
            except TransportError:
                pass

    # ---- endings ------------------------------------------------------------------------------
    def _release_held(self, t: Outbound) -> None:
        self.scheduler.drop_pages(t.held)
        t.held = []

    def _fail(self, t: Outbound, text: str, status: int) -> None:
        for req in self._end(t, finish_abort(text, status), failed=True):
            self.emit(req)

    def _end(self, t: Outbound, reason: dict, failed: bool) -> list[Req]:
        """Stop a transfer: free what it holds, end its request (if still running) with ``reason``."""
        self.out.pop(t.room, None)
        if t.peer is None:  # its decode side may still ask: answer at once, not after a timeout
            self.ended[t.room] = (str(reason.get("message")), time.monotonic() + self.timeout_s)
        self._release_held(t)
        self.stats.failures += failed
        if t.offload and not (t.replied and t.peer is not None):  # else its decode side frees it
            self.executor.free([t.room])
        if t.replied:  # the request is over here: its decode side's stream says how it ends
            return []
        if t.req.finished and t.req.finished_reason.get("type") == "abort":
            return [t.req]
        aborted = self.scheduler.abort(t.req.rid, reason)
        if not aborted:  # already out of the scheduler (prefilled, waiting for the decode side)
            t.req.finished_reason = dict(reason)
        return [t.req]

    def expire(self) -> None:
        if self.executor is not None:
            self.executor.expire()
        now = time.monotonic()
        self.meter.sample(sum(not t.prompt_done for t in self.out.values()), now)
        for t in self.out.values():  # still prefilling (queued, or a long prompt): say so
            if t.peer is not None and not t.replied and now - t.last_sent > self.timeout_s / 3:
                self._send(t, KVAlive(t.room))
        for t in [t for t in self.out.values() if t.deadline < now or t.error is not None]:
            what = "acknowledged" if t.peer else "claimed"
            late = f"no decode instance {what} the KV of bootstrap room {t.room} within {self.timeout_s:g} s"
            text = t.error or late
            logger.warning(text)
            if not t.replied:  # a replied one's decode side has its KV, or times out by itself
                self._cancel_peer(t, text)
            self._fail(t, text, 502 if t.error else 504)
        self.ended = {room: e for room, e in self.ended.items() if e[1] >= now}
        self.refused = {room: e for room, e in self.refused.items() if e[1] >= now}
        for room, (peer, _, deadline) in list(self.early.items()):
            if deadline < now:
                del self.early[room]
                text = f"no request with bootstrap room {room} reached this prefill instance"
                PD.send(self.transport, peer, KVCancel(room, text))
