"""PD KV pages over the Mooncake Transfer Engine: the prefill side writes pages one-sided into the
pages the decode side reserved.

Each side registers its whole KV pool (every layer's K and V) once and hands its
``KVPlaneDescriptor`` to the other over the control plane (ZeroMQ). The decode side reserves the
prompt's pages first and sends their ids; the prefill side then ``write_pages`` as chunks are
computed (contiguous runs of pages coalesced, all layers in one batched write), each write followed
by a notice of how many of the room's pages have landed (``landed``): the decode side counts them
as it would count ``KVPages`` messages. A sender that will write no more into a room's pages (its
transfer ended) says so with a ``fence`` notice, after which the receiver may reuse them. Nothing
is staged through host messages: over RDMA or NVLink the NIC or the GPU copies pool to pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import torch

from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport.base import TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine, Region, RegionError

PLANE_VERSION = 1
KV_LANDED_NOTICE = "adrenaline.kv_landed"  # message: "<bootstrap room> <pages of the room landed>"
KV_FENCE_NOTICE = "adrenaline.kv_fence"  # message: the bootstrap room no more writes will touch


class LayoutMismatch(TransportError):
    """The two pools' pages differ in shape or dtype: they cannot be copied as they are."""


class KVPageLayout(msgspec.Struct, frozen=True):
    num_layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str
    num_pages: int  # may differ between the sides; bounds the writes into this pool

    def page_bytes(self) -> int:
        return self.page_size * self.kv_heads * self.head_dim * getattr(torch, self.dtype).itemsize

    def same_pages(self, other: KVPageLayout) -> bool:
        return msgspec.structs.replace(self, num_pages=0) == msgspec.structs.replace(other, num_pages=0)


class KVPlaneDescriptor(msgspec.Struct, frozen=True):
    """What a peer needs to write into this pool: where it is and how its pages are laid out."""

    version: int
    session: str  # the engine's host:port
    k_addrs: list[int]  # per layer, the base address of K (then V) of shape [pages, page, heads, dim]
    v_addrs: list[int]
    layout: KVPageLayout

    def regions(self) -> list[Region]:
        n = self.layout.num_pages * self.layout.page_bytes()
        return [Region(a, n) for a in self.k_addrs + self.v_addrs]


def pool_layout(pool: KVPool) -> KVPageLayout:
    _, page, heads, dim = pool.k[0].shape
    return KVPageLayout(len(pool.k), page, heads, dim, str(pool.dtype).removeprefix("torch."), pool.num_pages)


def page_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first src page, first dst page, count) for maximal runs contiguous on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


@dataclass
class KVPlaneStats:
    writes: int = 0
    pages: int = 0
    bytes: int = 0
    failures: int = 0


class MooncakeKVPlane:
    """One instance's KV pool on a Mooncake engine (shareable with the offload plane)."""

    def __init__(self, pool: KVPool, engine: MooncakeEngine) -> None:
        for t in pool.k + pool.v:
            if not t.is_contiguous():
                raise ValueError("the Mooncake KV plane needs contiguous per-layer K/V tensors")
        self.pool, self.engine = pool, engine
        self.layout = pool_layout(pool)
        self._page_bytes = self.layout.page_bytes()
        self._regions = [engine.register(t) for t in pool.k + pool.v]
        self.peers: dict[str, KVPlaneDescriptor] = {}  # session -> descriptor, for pools we write to
        self.stats = KVPlaneStats()

    def descriptor(self) -> KVPlaneDescriptor:
        n = len(self.pool.k)
        addrs = [r.addr for r in self._regions]
        return KVPlaneDescriptor(PLANE_VERSION, self.engine.session, addrs[:n], addrs[n:], self.layout)

    def connect(self, peer: KVPlaneDescriptor) -> str:
        """Accept a peer's descriptor (LayoutMismatch if its pages differ); returns its session."""
        if peer.version != PLANE_VERSION:
            raise LayoutMismatch(
                f"KV plane version {peer.version} from {peer.session}, expected {PLANE_VERSION}"
            )
        if not self.layout.same_pages(peer.layout):
            raise LayoutMismatch(
                f"KV page layout differs: here {self.layout}, peer {peer.session} {peer.layout}"
            )
        self.peers[peer.session] = peer
        return peer.session

    def disconnect(self, session: str) -> None:
        self.peers.pop(session, None)

    def write_pages(
        self, session: str, src_pages: list[int], dst_pages: list[int], notice: tuple[int, int] | None = None
    ) -> int:
        """Write our ``src_pages`` into the peer's ``dst_pages`` for every layer; with ``notice``
        (room, pages), the peer learns that the room's first ``pages`` pages have landed once these
        have. Returns bytes.

        TransportError (the peer is dropped: connect again) or RegionError (nothing was written).
        """
        peer = self.peers.get(session)
        if peer is None:
            raise TransportError(f"no KV plane descriptor for {session}: connect first")
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        pb = self._page_bytes
        srcs, dsts, lens = [], [], []
        for mine, theirs in zip(self._regions, peer.k_addrs + peer.v_addrs):
            for s, d, n in page_runs(src_pages, dst_pages):
                srcs.append(mine.addr + s * pb)
                dsts.append(theirs + d * pb)
                lens.append(n * pb)
        notify = (KV_LANDED_NOTICE, f"{notice[0]} {notice[1]}") if notice is not None else None
        if self.pool.device.type == "cuda":  # the engine reads the pool itself: kernels must be done
            torch.cuda.synchronize(self.pool.device)
        try:
            self.engine.write(session, srcs, dsts, lens, peer.regions(), notify)
        except RegionError:
            raise  # our page ids were wrong: nothing was sent, the peer is fine
        except TransportError:
            self.stats.failures += 1
            self.disconnect(session)
            raise
        self.stats.writes += 1
        self.stats.pages += len(src_pages)
        self.stats.bytes += sum(lens)
        return sum(lens)

    def fence(self, session: str, room: int) -> None:
        """Tell the peer we will not write into ``room``'s pages again (after every earlier write)."""
        peer = self.peers.get(session)
        if peer is not None:
            self.engine.write(session, [], [], [], peer.regions(), (KV_FENCE_NOTICE, str(room)))

    def landed(self) -> list[tuple[int, int]]:
        """(room, pages of it landed) for each notice since the last call (receiving side)."""
        return [(int(r), int(n)) for r, n in (m.split() for m in self.engine.take(KV_LANDED_NOTICE))]

    def fenced(self) -> list[int]:
        """Rooms whose sender has fenced them since the last call (receiving side)."""
        return [int(m) for m in self.engine.take(KV_FENCE_NOTICE)]

    def close(self) -> None:
        for region in self._regions:
            self.engine.unregister(region)
        self._regions = []
        self.peers.clear()
