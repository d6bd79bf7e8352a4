"""PD KV pages over the Mooncake Transfer Engine, behind the ``KVPageMover`` interface.

Each instance registers its KV pool once (``MooncakeKVPlane``). The decode side sends the pool's
descriptor (session, base addresses, page layout) with each ask; the prefill side ``connect``\\s it
under the decode side's control-plane address and writes the computed pages one-sided into the
pages the decode side reserved, each write followed by a landed-pages notice.
"""

from __future__ import annotations

import msgspec

from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.base import TransportError
from adrenaline.transport.kv_pages import KVPageMover
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_kv import KVPlaneDescriptor, MooncakeKVPlane


class MooncakePages(KVPageMover):
    one_sided = True
    name = "mooncake"

    def __init__(self, pool: KVPool, engine: MooncakeEngine) -> None:
        self.plane = MooncakeKVPlane(pool, engine)
        self.sessions: dict[str, str] = {}  # control-plane address -> engine session

    def target(self) -> KVPlaneDescriptor:
        return self.plane.descriptor()

    def connect(self, peer: str, target: msgspec.Struct | None) -> None:
        if not isinstance(target, KVPlaneDescriptor):
            raise TransportError(
                "this prefill instance moves KV with --pd-transport mooncake, the decode instance does "
                "not (its ask carries no Mooncake descriptor): start both with the same --pd-transport"
            )
        self.sessions[peer] = self.plane.connect(target)

    def move(self, peer: str, room: int, first: int, src: list[int], dst: list[int]) -> int:
        session = self.sessions.get(peer)
        if session is None:
            raise TransportError(f"no Mooncake descriptor from {peer}")
        try:
            return self.plane.write_pages(session, src, dst, (room, first + len(src)))
        except TransportError:
            if session not in self.plane.peers:  # the peer failed: it must ask again
                del self.sessions[peer]
            raise

    def landed(self) -> list[tuple[int, int]]:
        return self.plane.landed()

    def fence(self, peer: str, room: int) -> None:
        session = self.sessions.get(peer)
        if session is not None:
            self.plane.fence(session, room)

    def fenced(self) -> list[int]:
        return self.plane.fenced()

    def close(self) -> None:
        self.plane.close()
