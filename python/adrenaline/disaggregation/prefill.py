"""Prefill side of PD: compute the prompt, ship its KV pages and first token to the decode side.

A routed request is prefilled like any other, limited to its first token. Its KV pages go to the
decode instance as soon as both are known: the pages the decode side allocated (its
``kv_request``) and the pages computed here, chunk by chunk while a long prompt is still being
prefilled. Pages a finished request no longer needs are kept by an extra reference until they are
sent. The request's own reply (the first token, prompt logprobs) leaves when the decode side
acknowledges the KV; a decode side that never asks or never acknowledges ends the request with
an error after ``timeout_s``, and every page is freed either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adrenaline.disaggregation.common import (
    KV_ACK,
    KV_ALIVE,
    KV_CANCEL,
    KV_DONE,
    KV_PAGES,
    KV_REQUEST,
    TransferManager,
    bootstrap_of,
    gather_pages,
    num_pages,
    scatter_pages,
)
from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.protocol import EXEC_ALLOC, EXEC_FREE, EXEC_REPLY, EXEC_STATS
from adrenaline.scheduler.batch import ScheduledReq
from adrenaline.scheduler.request import Req, finish_abort
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.transport.base import Message, Transport, TransportError

logger = logging.getLogger(__name__)


@dataclass
class Outbound:
    req: Req
    room: int
    peer: str | None = None  # the decode instance's transport address, once it asked
    dst_pages: list[int] = field(default_factory=list)
    sent: int = 0  # pages sent so far
    held: list[int] = field(default_factory=list)  # computed, unsent pages we keep a reference on
    prompt_done: bool = False  # the whole prompt's KV is computed
    done_sent: bool = False
    offload: bool = False  # the KV goes into the attention executor's pool
    deadline: float = float("inf")  # set while waiting on the decode side, not while computing
    last_sent: float = 0.0  # keepalives tell a waiting decode side we are still at it


class PrefillTransfers(TransferManager):
    role = "prefill"

    def __init__(
        self,
        scheduler: Scheduler,
        transport: Transport,
        timeout_s: float,
        emit: Callable[[Req], None],
        executor: tuple[str, KVPool] | None = None,
    ) -> None:
        """``executor``: the colocated attention executor's address and the pool it shares with us."""
        super().__init__(scheduler, transport, timeout_s, emit)
        self.executor, self.offload_pool = executor or (None, None)
        self._asks = 0
        self.executor_down = False  # it stopped answering: requests then stay local
        self.out: dict[int, Outbound] = {}
        self.early: dict[int, tuple[Message, float]] = {}  # kv_requests ahead of their request
        scheduler.on_forward = self.on_forward

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
        self.scheduler.add_request(req)
        t = self.out[room] = Outbound(req, room)
        early = self.early.pop(room, None)
        if early is not None:
            self._attach(t, early[0])

    def requests(self) -> list[Req]:
        return [t.req for t in self.out.values()]

    def abort(self, rid: str, reason: dict) -> list[Req]:
        hit = [t for t in self.out.values() if t.req.rid == rid]
        out: list[Req] = []
        for t in hit:
            self._cancel_peer(t, f"aborted on the prefill instance: {reason.get('message')}")
            out += self._end(t, reason, failed=False)
        return out

    @property
    def busy(self) -> bool:
        return bool(self.out or self.early)

    # ---- the scheduler's hooks ----------------------------------------------------------------
    def on_forward(self, items: list[ScheduledReq]) -> None:
        """Send newly computed full pages; keep the rest of a finished prompt until it can go."""
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
                t.held = list(t.req.pages[t.sent : ready])
                self.scheduler.allocator.retain(t.held)
                t.deadline = time.monotonic() + self.timeout_s

    def after_step(self, progressed: list[Req]) -> list[Req]:
        """The requests to report now: routed ones wait for the decode side's acknowledgement."""
        report = []
        for req in progressed:
            t = self._outbound(req)
            if t is None:
                report.append(req)
            elif req.finished and (not t.prompt_done or req.finished_reason["type"] == "abort"):
                self._cancel_peer(t, req.finished_reason.get("message", "prefill failed"))
                report += self._end(t, req.finished_reason, failed=True)
            elif req.finished:
                self._send_done(t)
        return report

    def _outbound(self, req: Req) -> Outbound | None:
        boot = req.extra.get("bootstrap")
        t = self.out.get(boot[2]) if boot else None
        return t if t is not None and t.req is req else None

    # ---- messages from decode instances -------------------------------------------------------
    def handle(self, msg: Message) -> None:
        room = msg.meta.get("room")
        t = self.out.get(room)
        if msg.kind == KV_REQUEST:
            if msg.meta.get("layout") != self.layout:
                text = f"KV layout mismatch: prefill {self.layout}, decode {msg.meta.get('layout')}"
                self.transport.send(msg.peer, KV_CANCEL, {"room": room, "message": text})
                if t is not None:
                    self._end(t, finish_abort(text, 500), failed=True)
            elif t is None:
                self.early[room] = (msg, time.monotonic() + self.timeout_s)
            else:
                self._attach(t, msg)
        elif msg.kind == KV_ALIVE:  # a decode side queued for room still wants this KV
            if t is not None and t.peer is None:
                t.deadline = time.monotonic() + self.timeout_s
        elif t is None or t.peer != msg.peer:
            logger.debug("%s for unknown bootstrap room %s from %s dropped", msg.kind, room, msg.peer)
        elif msg.kind == KV_ACK:
            self.stats.transfers += 1
            self.emit(t.req)
            del self.out[room]
        elif msg.kind == KV_CANCEL:
            text = f"the decode instance cancelled the transfer: {msg.meta.get('message')}"
            t.peer = None  # it asked us to stop: no cancel back
            for req in self._end(t, finish_abort(text, 502), failed=True):
                self.emit(req)

    def _attach(self, t: Outbound, msg: Message) -> None:
        need = num_pages(len(t.req.input_ids), self.page_size)
        pages = msg.meta["pages"]
        if msg.meta.get("offload"):  # the KV goes to our executor's pool, not to the decode side
            pages = self._executor_pages(t.room, len(t.req.input_ids))
            if pages is None:
                text = "this prefill instance's attention executor cannot take the request"
                self.transport.send(msg.peer, KV_CANCEL, {"room": t.room, "message": text, "local_ok": True})
                return
            t.offload = True
        t.peer, t.dst_pages = msg.peer, list(pages)
        if len(t.dst_pages) != need:
            text = f"decode allocated {len(t.dst_pages)} pages for a {need}-page prompt"
            self._cancel_peer(t, text)
            for req in self._end(t, finish_abort(text, 500), failed=True):
                self.emit(req)
            return
        if t.prompt_done:
            t.deadline = time.monotonic() + self.timeout_s  # for its acknowledgement
            self._send_pages(t, t.held)
            self._release_held(t)  # gathered into the message: the pool's copy is no longer needed
        elif t.sent < len(t.req.pages):  # earlier chunks, computed before the decode side asked
            ready = min(t.req.num_computed, len(t.req.input_ids)) // self.page_size
            self._send_pages(t, t.req.pages[t.sent : ready])
        if t.req.finished:
            self._send_done(t)

    # ---- sending ------------------------------------------------------------------------------
    def _send_pages(self, t: Outbound, pages: list[int]) -> None:
        if not pages:
            return
        first = t.sent
        try:
            data = gather_pages(self.pool, pages)
            if t.offload:  # in place, into the pool we share with the executor: nothing crosses
                scatter_pages(self.offload_pool, t.dst_pages[first : first + len(pages)], data)
            else:
                self._send(t, KV_PAGES, {"room": t.room, "first": first}, [data])
                self.stats.kv_bytes += data.numel() * data.element_size()
        except TransportError as e:
            logger.warning("KV pages of room %s not sent: %s", t.room, e)
            return  # the deadline ends it
        t.sent += len(pages)
        self.stats.pages += len(pages)

    def _send_done(self, t: Outbound) -> None:
        if t.peer is None or t.done_sent or t.sent < len(t.dst_pages):
            return
        req = t.req
        meta = {
            "room": t.room,
            "token": req.output_ids[0],
            "logprob": req.output_logprobs[0] if req.output_logprobs else None,
            "top": req.output_top_logprobs[0] if req.output_top_logprobs else None,
            "executor": self.executor if t.offload else None,
        }
        try:
            self._send(t, KV_DONE, meta)
            t.done_sent = True
        except TransportError as e:
            logger.warning("first token of room %s not sent: %s", t.room, e)

    def _send(self, t: Outbound, kind: str, meta: dict, tensors: list | tuple = ()) -> None:
        self.transport.send(t.peer, kind, meta, tensors)
        t.last_sent = time.monotonic()

    def _ask_executor(self, kind: str, meta: dict, timeout_s: float) -> dict:
        """One request/reply with the colocated executor (TransportError when it does not answer)."""
        self._asks += 1
        ask = self._asks
        self.transport.send(self.executor, kind, {**meta, "ask": ask})
        return self.transport.recv(
            lambda m: m.kind == EXEC_REPLY and m.meta.get("ask") == ask, timeout_s
        ).meta

    def _executor_pages(self, room: int, tokens: int) -> list[int] | None:
        """Pages for a prompt in the executor's pool (None: no executor, full or not answering)."""
        if self.executor is None or self.executor_down:
            return None
        try:
            reply = self._ask_executor(EXEC_ALLOC, {"room": room, "tokens": tokens}, 5.0)
        except TransportError as e:
            logger.error("attention executor not answering (%s): offloading to it stops", e)
            self.transport.send(self.executor, EXEC_FREE, {"rooms": [room]})  # if it answers late
            self.executor_down = True
            return None
        if "error" in reply:
            logger.info("room %s not offloaded: %s", room, reply["error"])
            return None
        return reply["pages"]

    def executor_stats(self) -> dict:
        try:
            return self._ask_executor(EXEC_STATS, {}, 2.0)["stats"]
        except TransportError as e:
            return {"error": f"attention executor not answering: {e}"}

    def info(self) -> dict:
        info = super().info()
        if self.executor is not None:
            info["executor"] = {"address": self.executor, **self.executor_stats()}
        return info

    def _cancel_peer(self, t: Outbound, message: str) -> None:
        if t.peer is not None:
            try:
                self.transport.send(t.peer, KV_CANCEL, {"room": t.room, "message": message})
            except TransportError:
                pass

    # ---- endings ------------------------------------------------------------------------------
    def _release_held(self, t: Outbound) -> None:
        self.scheduler.allocator.free(t.held)
        t.held = []

    def _end(self, t: Outbound, reason: dict, failed: bool) -> list[Req]:
        """Stop a transfer: free what it holds, end its request (if still running) with ``reason``."""
        self.out.pop(t.room, None)
        self._release_held(t)
        if t.offload:
            self.transport.send(self.executor, EXEC_FREE, {"rooms": [t.room]})
        self.stats.failures += failed
        if t.req.finished and t.req.finished_reason.get("type") == "abort":
            return [t.req]
        aborted = self.scheduler.abort(t.req.rid, reason)
        if not aborted:  # already out of the scheduler (prefilled, waiting for the decode side)
            t.req.finished_reason = dict(reason)
        return [t.req]

    def expire(self) -> None:
        now = time.monotonic()
        for t in self.out.values():  # still prefilling (queued, or a long prompt): say so
            if t.peer is not None and not t.done_sent and now - t.last_sent > self.timeout_s / 3:
                self._send(t, KV_ALIVE, {"room": t.room})
        for t in [t for t in self.out.values() if t.deadline < now]:
            what = "acknowledged" if t.peer else "claimed"
            text = f"no decode instance {what} the KV of bootstrap room {t.room} within {self.timeout_s:g} s"
            logger.warning(text)
            self._cancel_peer(t, text)
            for req in self._end(t, finish_abort(text, 504), failed=True):
                self.emit(req)
        for room, (msg, deadline) in list(self.early.items()):
            if deadline < now:
                del self.early[room]
                text = f"no request with bootstrap room {room} reached this prefill instance"
                self.transport.send(msg.peer, KV_CANCEL, {"room": room, "message": text})
