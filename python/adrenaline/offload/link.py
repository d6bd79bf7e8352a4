"""A prefill scheduler's link to its colocated attention executor; it never waits for a reply.

Pages for an offloaded prompt are asked for (``reserve``) and granted later: the executor's reply
arrives through the PD role's transport, which hands it to ``handle``, and the callback continues
the transfer. An executor that leaves an ask unanswered for ``ask_timeout_s`` is marked down:
offloading to it stops and pending asks get None; so does its process's death (``lost``), until
a new executor takes over (``restarted``). Its statistics are refreshed in the background
(every ``STATS_INTERVAL_S``), so ``/server_info`` reads the last reply instead of waiting for one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.protocol import (
    OFFLOAD,
    OFFLOAD_VERSION,
    ExecAlloc,
    ExecAllocReply,
    ExecFree,
    ExecStatsAsk,
    ExecStatsReply,
    ExecutorStats,
)
from adrenaline.transport.base import Message, Transport, TransportError
from adrenaline.transport.kv_pages import InPlacePages

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.2
Granted = Callable[[list[int] | None], None]  # the pages in the executor's pool, or None: refused


@dataclass
class _Ask:
    room: int
    granted: Granted
    deadline: float


class ExecutorLink:
    def __init__(
        self, transport: Transport, address: str, src: KVPool, shared: KVPool, ask_timeout_s: float = 5.0
    ) -> None:
        self.transport = transport
        self.address = address
        self.mover = InPlacePages(src, shared)  # prompt KV goes straight into the executor's pool
        self.ask_timeout_s = ask_timeout_s
        self.down = False  # it stopped answering: requests then stay local
        self.asks: dict[int, _Ask] = {}
        self._ids = itertools.count(1)
        self.stats: ExecutorStats | None = None
        self._stats_ask: tuple[int, float] | None = None  # (ask, sent at)
        self._stats_at = 0.0
        self.restarts = 0
        self.watch: Callable[[], None] | None = None  # run first in ``expire``: the process's keeper

    def reserve(
        self, room: int, tokens: int, granted: Granted, future_tokens: int = 0, client: str = ""
    ) -> None:
        """Pages for ``tokens`` of prompt KV, the ledger holding ``future_tokens`` (prompt +
        max_new_tokens) for decode instance ``client``."""
        if self.down:
            granted(None)
            return
        ask = next(self._ids)
        self.asks[ask] = _Ask(room, granted, time.monotonic() + self.ask_timeout_s)
        self._send(ExecAlloc(OFFLOAD_VERSION, ask, room, tokens, future_tokens, client))

    @property
    def live_stats(self) -> ExecutorStats | None:
        """The last statistics, None while the executor is down."""
        return None if self.down else self.stats

    def free(self, rooms: list[int]) -> None:
        self._send(ExecFree(rooms))

    def _send(self, msg) -> None:
        try:
            OFFLOAD.send(self.transport, self.address, msg)
        except TransportError as e:
            logger.warning("attention executor unreachable: %s", e)

    def handle(self, msg: Message) -> bool:
        """Take the executor's replies (True when ``msg`` was one)."""
        if msg.peer != self.address:
            return False
        m = OFFLOAD.parse(msg)
        if isinstance(m, ExecAllocReply):
            self.stats, self._stats_at = m.stats, time.monotonic()
            ask = self.asks.pop(m.ask, None)
            if ask is None:  # answered after its timeout: give the pages back
                self.free([m.room])
            else:
                if m.error:
                    logger.info("room %s not offloaded: %s", m.room, m.error)
                ask.granted(m.pages if m.error is None else None)
        elif isinstance(m, ExecStatsReply):
            self.stats, self._stats_at = m.stats, time.monotonic()
            self._stats_ask = None
        return m is not None

    def lost(self) -> None:
        """The executor process died: refuse pending and new asks, forget its statistics."""
        self.down = True
        self.stats = None
        self._stats_ask = None
        for ask in self.asks.values():
            ask.granted(None)
        self.asks.clear()

    def restarted(self, address: str) -> None:
        """A new executor (empty pool) serves at ``address``: offload to it."""
        self.address = address
        self.down = False
        self.restarts += 1
        self._stats_at = 0.0

    def expire(self) -> None:
        """Time out unanswered asks; ask for fresh statistics when due."""
        if self.watch is not None:
            self.watch()
        now = time.monotonic()
        late = [a for a in self.asks if self.asks[a].deadline < now]
        if late:
            logger.error("attention executor not answering: offloading to it stops")
            self.down = True
        for a in late:
            ask = self.asks.pop(a)
            self.free([ask.room])  # in case it answers late
            ask.granted(None)
        if self._stats_ask is None and now - self._stats_at > STATS_INTERVAL_S:
            ask = next(self._ids)
            self._stats_ask = (ask, now)
            self._send(ExecStatsAsk(ask))
        elif self._stats_ask is not None and now - self._stats_ask[1] > self.ask_timeout_s:
            self._stats_ask = None  # unanswered: ask again

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "address": self.address,
            "down": self.down,
            "pending_asks": len(self.asks),
            "restarts": self.restarts,
        }
        if self.stats is None:
            return {**info, "error": "attention executor has not answered yet"}
        s = self.stats
        age = time.monotonic() - self._stats_at
        return {
            **info,
            **msgspec.structs.asdict(s),
            "kv_usage": s.used_pages / s.num_pages,
            "stats_age_s": age,
        }
