"""The same-host fast path of the per-layer exchange, decode side.

``ShmExchange`` offers each executor, the first time a step goes to it, a shared-memory channel
(``ShmOffer`` over ZeroMQ). An executor on this host attaches and answers; from then on that
executor's step metadata, frees, q|k|v and outputs go through the channel (no pickling, no socket
call per layer). An executor that refuses (another host, another layout) or does not answer keeps
the TCP path (``TransportExchange``), as does any step whose group has more rows than the channel
holds: a batch cannot overflow the buffers. Control (page allocation, statistics) stays on ZeroMQ.
Under ``--pd-transport mooncake`` the path for executors on other hosts is the Mooncake exchange
(``fallback``) instead of TCP.

The executor reports its KV pages in the channel at each step (``executor_pages``, the load view).
Failures read as on TCP: a dead executor raises ``RemoteAttentionError`` as soon as its process
exits (a pidfd), a stopped or failing one within ``timeout_s``, and the scheduler recomputes
locally; a broken channel is closed (its name was
unlinked at attach, so nothing stays in ``/dev/shm``) and that executor goes back to TCP
(``mode="auto"``) or is offered a new channel on its next step (``mode="shm"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from adrenaline.attention.base import RemoteAttentionError
from adrenaline.offload.exchange import AttentionExchange, Group, TransportExchange
from adrenaline.offload.protocol import OFFLOAD, OFFLOAD_VERSION, ShmOffer, ShmOfferReply
from adrenaline.transport.base import Message, Transport, TransportError
from adrenaline.transport.shm_exchange import ShmClientChannel
from adrenaline.transport.shm_segment import ShmLayout

logger = logging.getLogger(__name__)


class ShmExchange(AttentionExchange):
    def __init__(
        self,
        transport: Transport,
        layout: ShmLayout,
        timeout_s: float,
        mode: str = "auto",
        fallback: AttentionExchange | None = None,
    ) -> None:
        if mode not in ("auto", "shm"):
            raise ValueError(f"ShmExchange mode {mode!r}: auto or shm (tcp is TransportExchange)")
        super().__init__()
        self.tcp = fallback or TransportExchange(transport)  # executors without a channel
        self.executor_pages = self.tcp.executor_pages  # one view of the executors' KV usage
        self.layout, self.timeout_s, self.mode = layout, timeout_s, mode
        self.channels: dict[str, ShmClientChannel] = {}
        self.tcp_only: set[str] = set()  # executors that refused or broke a channel (auto)
        self.errors: dict[str, str] = {}  # executor -> why this step's group cannot be served
        self.exited: set[str] = set()  # executors whose channel broke as their process exited

    @property
    def transport(self) -> Transport:
        return self.tcp.transport

    # ---- the handshake --------------------------------------------------------------------------
    def _channel(self, executor: str) -> ShmClientChannel | None:
        """The executor's channel, offered now if it has none; None: TCP for this executor."""
        ch = self.channels.get(executor)
        if ch is not None or executor in self.tcp_only:
            return ch
        try:
            ch = ShmClientChannel.create(self.layout, self.timeout_s)
        except TransportError as e:
            return self._refused(executor, str(e))
        try:
            OFFLOAD.send(self.transport, executor, ShmOffer(OFFLOAD_VERSION, ch.offer()))
            reply = OFFLOAD.parse(self.transport.recv(self._is_reply(executor), self.timeout_s, executor))
            if not isinstance(reply, ShmOfferReply) or reply.error is not None:
                raise TransportError(getattr(reply, "error", None) or getattr(reply, "message", "refused"))
            ch.wait_attached(self.timeout_s)
        except TransportError as e:
            ch.close()
            return self._refused(executor, str(e))
        logger.info("attention executor %s: per-layer exchange over shared memory", executor)
        self.channels[executor] = ch
        self.exited.discard(executor)
        return ch

    @staticmethod
    def _is_reply(executor: str):
        def match(m: Message) -> bool:
            return m.peer == executor and m.kind == ShmOfferReply.__name__

        return match

    def _refused(self, executor: str, why: str) -> None:
        if self.mode == "shm":
            self.errors[executor] = f"no shared-memory channel to {executor}: {why}"
        else:
            logger.info("attention executor %s keeps the TCP exchange: %s", executor, why)
            self.tcp_only.add(executor)
        return None

    def _broke(self, executor: str, e: Exception) -> RemoteAttentionError:
        """Close a failed channel (unless the executor only reported an error) and say why."""
        ch = self.channels.get(executor)
        if ch is not None and (ch.broken or ch.closing):
            if ch.peer_gone():  # known now, by its pidfd: not when TCP's monitor notices
                self.exited.add(executor)
                self.executor_pages.pop(executor, None)
            self.channels.pop(executor).close()
            if self.mode == "auto":
                self.tcp_only.add(executor)
        return RemoteAttentionError(f"attention executor {executor}: {e}")

    def _split(self, groups: Sequence[Group]) -> tuple[list[tuple[Group, ShmClientChannel]], list[Group]]:
        """Which groups go through a channel this step, and which over TCP."""
        shm, tcp = [], []
        for g in groups:
            ch = self.channels.get(g.executor)
            if ch is not None and len(g.rooms) <= self.layout.max_rows:
                shm.append((g, ch))
            elif g.executor not in self.errors:
                tcp.append(g)
        return shm, tcp

    # ---- AttentionExchange ----------------------------------------------------------------------
    def begin(self, step: int, groups: Sequence[Group], frees: dict[str, list[int]]) -> None:
        self.errors.clear()
        for g in groups:
            self._channel(g.executor)
        shm, tcp = self._split(groups)
        for g, ch in shm:
            pending = frees.pop(g.executor, [])
            try:
                taken = ch.begin(step, g.rooms, g.seq_lens, pending)
            except TransportError as e:
                self.errors[g.executor] = str(self._broke(g.executor, e))
                taken = 0
            if pending[taken:]:
                frees[g.executor] = pending[taken:]
        self.tcp.begin(step, tcp, frees)

    def submit(self, step: int, layer: int, groups: Sequence[Group], q: Tensor, k: Tensor, v: Tensor) -> None:
        shm, tcp = self._split(groups)
        for g, ch in shm:
            if g.executor in self.errors:
                continue
            rows = slice(g.start, g.start + len(g.rooms))
            try:
                ch.submit(layer, q[rows], k[rows], v[rows])
            except TransportError as e:
                self.errors[g.executor] = str(self._broke(g.executor, e))
        self.tcp.submit(step, layer, tcp, q, k, v)

    def wait(self, step: int, layer: int, group: Group, timeout_s: float) -> torch.Tensor:
        error = self.errors.get(group.executor)
        if error is not None:
            raise RemoteAttentionError(error)
        ch = self.channels.get(group.executor)
        if ch is None or len(group.rooms) > self.layout.max_rows:
            return self.tcp.wait(step, layer, group, timeout_s)
        try:
            out = ch.wait(layer).clone()  # the view is reused two layers on
        except TransportError as e:
            self.executor_pages.pop(group.executor, None)
            raise self._broke(group.executor, e) from e
        self.executor_s = ch.attend_s
        if layer == 0 and (pages := ch.pages()) is not None:
            self.executor_pages[group.executor] = pages
        return out

    def free(self, executor: str, rooms: list[int]) -> None:
        ch = self.channels.get(executor)
        while ch is not None and rooms:
            try:
                rooms = rooms[ch.post_frees(rooms) :]
            except TransportError as e:
                self._broke(executor, e)
                break
        if rooms:
            self.tcp.free(executor, rooms)

    def gone(self, executor: str) -> bool:
        ch = self.channels.get(executor)
        if ch is not None:
            return ch.peer_gone()
        return executor in self.exited or self.tcp.gone(executor)

    def info(self) -> dict:
        return {
            "kind": self.mode,
            "shm_executors": sorted(self.channels),
            "tcp_executors": sorted(self.tcp_only),
            **({"fallback": self.tcp.info()} if not isinstance(self.tcp, TransportExchange) else {}),
        }

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()
        self.tcp.close()
