"""What both PD roles share: bootstrap fields, the KV layout, statistics, the manager base."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from adrenaline.core.request import Req
from adrenaline.disaggregation.kv_move import TransportPages
from adrenaline.disaggregation.protocol import KVLayout
from adrenaline.kv_cache.pool import KVPool
from adrenaline.scheduler.hooks import SchedulerHooks
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.transport.base import Message, Transport
from adrenaline.transport.kv_pages import KVPageMover

# SGLang's FAKE_BOOTSTRAP_HOST: warmup and health requests carry it and are served locally.
FAKE_BOOTSTRAP_HOST = "2.2.2.2"


def bootstrap_of(req: Req) -> tuple[str, int, int] | None:
    """(host, port, room) of a request routed for PD; None for one to serve locally.

    ValueError (HTTP 400) when the fields are missing or malformed: a PD instance only takes
    requests that SGLang's router prepared.
    """
    host, port, room = req.bootstrap
    if host == FAKE_BOOTSTRAP_HOST:
        return None
    if host is None or port is None or room is None:
        raise ValueError(
            "this is a PD instance: requests need bootstrap_host, bootstrap_port and bootstrap_room "
            "(send them through SGLang's router in PD mode)"
        )
    if not isinstance(host, str) or not host:
        raise ValueError(f"bootstrap_host must be a host name, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"bootstrap_port must be an integer port in 1..65535, got {port!r}")
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 2**64:
        raise ValueError(f"bootstrap_room must be an integer in [0, 2**64), got {room!r}")
    return host, port, room


def kv_layout(pool: KVPool) -> KVLayout:
    return KVLayout(
        num_layers=len(pool.k),
        page_size=pool.page_size,
        kv_heads=pool.k[0].shape[2],
        head_dim=pool.k[0].shape[3],
        dtype=str(pool.dtype).removeprefix("torch."),
    )


@dataclass
class TransferStats:
    transfers: int = 0  # requests whose KV crossed successfully
    failures: int = 0  # requests ended by a timeout, a cancel or a dead peer
    pages: int = 0  # KV pages moved
    kv_bytes: int = 0  # KV bytes moved over the transport (offloaded requests move none)
    kv_send_s: float = 0.0  # prefill: time the loop spent handing pages to the data plane
    handoff_s: float = 0.0  # prefill: summed time from each prompt computed to its decode side's ack

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class TransferManager(SchedulerHooks, ABC):
    """One PD role's side of the KV handshake, driven by the scheduler loop.

    The loop hands it every request (``add_request``), lets it drain its transport every iteration
    (``tick``) and reports the requests it ``emit``\\s; aborts reach it through ``abort``. It plugs
    into the scheduler as its ``SchedulerHooks`` and uses only the scheduler's declared calls.
    """

    role: str

    def __init__(
        self,
        scheduler: Scheduler,
        pool: KVPool,
        transport: Transport,
        timeout_s: float,
        emit: Callable[[Req], None],
        mover: KVPageMover | None = None,
    ) -> None:
        """``mover``: how KV pages travel (default: ``KVPages`` messages over ``transport``)."""
        self.scheduler = scheduler
        scheduler.attach(self)
        self.pool = pool
        self.page_size = pool.page_size
        self.layout = kv_layout(pool)
        self.transport = transport
        self.mover = mover or TransportPages(pool, transport)
        self.timeout_s = timeout_s
        self.emit = emit
        self.stats = TransferStats()

    @abstractmethod
    def add_request(self, req: Req) -> None:
        """Admit a request from the front end (ValueError: the client's mistake)."""

    @abstractmethod
    def requests(self) -> list[Req]:
        """Requests this manager holds (some may also be in the scheduler)."""

    @abstractmethod
    def abort(self, rid: str, reason: dict) -> list[Req]: ...

    @abstractmethod
    def handle(self, msg: Message) -> None: ...

    @abstractmethod
    def expire(self) -> None:
        """End what waited on a peer for longer than ``timeout_s``."""

    def after_step(self, progressed: list[Req]) -> list[Req]:
        """Which of a step's progressed requests to report now."""
        return progressed

    def tick(self) -> None:
        while (msg := self.transport.poll(0)) is not None:
            self.handle(msg)
        self.expire()

    def info(self) -> dict[str, Any]:
        ts = self.transport.stats
        return {
            "role": self.role,
            "transport": type(self.transport).__name__,
            "kv_plane": self.mover.name,
            "address": self.transport.address,
            "peers": self.transport.peers(),
            "timeout_s": self.timeout_s,
            "in_flight": len(self.requests()),
            **self.stats.as_dict(),
            "bytes_sent": ts.bytes_sent,
            "bytes_received": ts.bytes_received,
        }
