"""KV pages to a decode instance over the PD transport (host memory over TCP, or NCCL): one
``KVPages`` message per batch of pages; the decode role scatters it into the pages it reserved."""

from __future__ import annotations

from adrenaline.disaggregation.protocol import PD, KVPages
from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.base import Transport
from adrenaline.transport.kv_pages import KVPageMover, gather_pages


class TransportPages(KVPageMover):
    def __init__(self, pool: KVPool, transport: Transport) -> None:
        self.pool, self.transport = pool, transport

    def move(self, peer: str, room: int, first: int, src: list[int], dst: list[int]) -> int:
        data = gather_pages(self.pool, src)
        PD.send(self.transport, peer, KVPages(room, first), [data])
        return data.numel() * data.element_size()
