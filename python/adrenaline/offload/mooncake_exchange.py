"""The per-layer exchange over the Mooncake Transfer Engine, decode side: for executors on other
hosts (or any, when forced with ``--offload-exchange mooncake``).

The first step that goes to an executor offers it a link (``MooncakeOffer`` over ZeroMQ, with this
side's registered output buffer); from then on the step's metadata, frees, q|k|v and outputs of
that executor are one-sided writes with notices (``transport.mooncake_offload.OffloadLink``). An
executor that refuses (no Mooncake there) or does not answer keeps the fallback path, as does a
group with more rows than the link holds. Failures read as on the other paths: the group's wait
raises ``RemoteAttentionError`` within its timeout and the scheduler recomputes locally. A link
is kept for the executor's lifetime: its buffers stay registered, so a late write of a failed
step can never land in freed memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adrenaline.attention.base import RemoteAttentionError
from adrenaline.offload.exchange import AttentionExchange, Group, TransportExchange
from adrenaline.offload.protocol import OFFLOAD, OFFLOAD_VERSION, MooncakeOffer, MooncakeOfferReply
from adrenaline.transport.base import Message, PeerTimeout, Transport, TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_offload import OffloadLink

logger = logging.getLogger(__name__)


class MooncakeExchange(AttentionExchange):
    def __init__(
        self,
        transport: Transport,
        engine: MooncakeEngine,
        heads: tuple[int, int, int],
        dtype: torch.dtype,
        max_rows: int,
        timeout_s: float,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.tcp = TransportExchange(transport)
        self.executor_pages = self.tcp.executor_pages
        self.engine, self.link_args = engine, (heads, dtype, max_rows, device)
        self.max_rows, self.timeout_s = max_rows, timeout_s
        self.links: dict[str, OffloadLink] = {}
        self.refused: set[str] = set()  # executors that keep the TCP path
        self.errors: dict[str, str] = {}  # executor -> why this step's group cannot be served

    @property
    def transport(self) -> Transport:
        return self.tcp.transport

    def _link(self, executor: str) -> OffloadLink | None:
        """The executor's link, offered now if it has none; None: TCP for this executor."""
        link = self.links.get(executor)
        if link is not None or executor in self.refused:
            return link
        link = OffloadLink(self.engine, *self.link_args)
        try:
            OFFLOAD.send(self.transport, executor, MooncakeOffer(OFFLOAD_VERSION, link.endpoint()))
            reply = OFFLOAD.parse(self.transport.recv(self._is_reply(executor), self.timeout_s))
            if not isinstance(reply, MooncakeOfferReply) or reply.endpoint is None:
                raise TransportError(getattr(reply, "error", None) or "refused")
            link.connect(reply.endpoint)
        except TransportError as e:
            link.close()
            logger.info("attention executor %s keeps the TCP exchange: %s", executor, e)
            self.refused.add(executor)
            return None
        logger.info("attention executor %s: per-layer exchange over Mooncake", executor)
        self.links[executor] = link
        return link

    @staticmethod
    def _is_reply(executor: str) -> Callable[[Message], bool]:
        return lambda m: m.peer == executor and m.kind == MooncakeOfferReply.__name__

    def _split(self, groups: Sequence[Group]) -> tuple[list[Group], list[Group]]:
        """Which groups go over Mooncake this step, and which over TCP."""
        ours = [g for g in groups if g.executor in self.links and len(g.rooms) <= self.max_rows]
        return ours, [g for g in groups if g not in ours]

    def _call(self, g: Group, send: Callable[[OffloadLink], None]) -> None:
        if g.executor in self.errors:
            return
        try:
            send(self.links[g.executor])
        except TransportError as e:
            self.errors[g.executor] = f"attention executor {g.executor}: {e}"

    # ---- AttentionExchange ----------------------------------------------------------------------
    def begin(self, step: int, groups: Sequence[Group], frees: dict[str, list[int]]) -> None:
        self.errors.clear()
        for g in groups:
            self._link(g.executor)
        ours, tcp = self._split(groups)
        for g in ours:
            meta = {"rooms": g.rooms, "seq_lens": g.seq_lens, "frees": frees.pop(g.executor, [])}
            self._call(g, lambda link, meta=meta: link.begin(step, meta))
        self.tcp.begin(step, tcp, frees)

    def submit(self, step: int, layer: int, groups: Sequence[Group], q: Tensor, k: Tensor, v: Tensor) -> None:
        ours, tcp = self._split(groups)
        if ours:
            qkv = torch.cat([q, k, v], dim=1)
            for g in ours:
                rows = qkv[g.start : g.start + len(g.rooms)]
                self._call(g, lambda link, rows=rows: link.submit(layer, rows))
        self.tcp.submit(step, layer, tcp, q, k, v)

    def wait(self, step: int, layer: int, group: Group, timeout_s: float) -> torch.Tensor:
        if group.executor in self.errors:
            raise RemoteAttentionError(self.errors[group.executor])
        link = self.links.get(group.executor)
        if link is None or len(group.rooms) > self.max_rows:
            return self.tcp.wait(step, layer, group, timeout_s)
        try:
            return link.wait(layer, timeout_s)
        except PeerTimeout as e:
            raise RemoteAttentionError(str(e)) from e
        except TransportError as e:
            raise RemoteAttentionError(f"attention executor {group.executor}: {e}") from e

    def free(self, executor: str, rooms: list[int]) -> None:
        link = self.links.get(executor)
        if link is None:
            self.tcp.free(executor, rooms)
            return
        try:
            link.free(rooms)
        except TransportError as e:
            logger.warning("frees for attention executor %s not sent: %s", executor, e)

    def info(self) -> dict:
        return {
            "kind": "mooncake",
            "mooncake_executors": sorted(self.links),
            "tcp_executors": sorted(self.refused),
        }

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
