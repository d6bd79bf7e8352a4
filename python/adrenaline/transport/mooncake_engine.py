"""The Mooncake Transfer Engine behind our errors: one-sided writes into a peer's registered memory.

``mooncake.engine.TransferEngine`` returns codes instead of raising, falls back to TCP without a
word when the requested protocol cannot run, and blocks a sync call on a frozen peer until its
own timeouts. This wrapper turns codes into ``TransportError``, refuses a protocol the engine
could not use before it starts, caps the engine's timeouts at ours, refuses writes outside the
peer's registered regions before they are issued, and sorts completion notices (``notify``) by
name so several planes can share one engine.

One wait it cannot cap: the engine sends a notice over its handshake socket after the data has
landed, with a read timeout fixed at 60 s in the engine, and only logs the notice's failure. A
peer that freezes in that window holds ``write`` for up to 60 s and the write still reports
success; the receiver, which never sees the notice, ends the request on its own timeout.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adrenaline.transport.base import TransportError, reachable_host

INSTALL_HINT = (
    'pip install -e ".[mooncake]" (CPU; on GPU machines pip install mooncake-transfer-engine instead) '
    "and the system libraries: apt-get install libibverbs1 libnl-3-200 libnl-route-3-200"
)
PROTOCOLS = ("tcp", "rdma", "nvlink", "nvlink_intra")
# Read by the engine when it is created; each is capped at our timeout (whole seconds, >= 1).
TIMEOUT_VARS = ("MC_TRANSFER_TIMEOUT", "MC_TCP_PROGRESS_TIMEOUT_SEC", "MC_HANDSHAKE_CONNECT_TIMEOUT")
_USER_TIMEOUTS = {var: os.environ.get(var, "") for var in TIMEOUT_VARS}
# Entries per batched write: the engine's TCP lane rejects a batch of ~3000 (queue full) and stays
# full for a moment, so longer lists go in several sync batches.
MAX_BATCH = 1024
_NVLINK_FLAGS = {"nvlink": "SUPPORT_MNNVL", "nvlink_intra": "SUPPORT_INTRA_NVLINK"}


class MooncakeUnavailable(ImportError):
    """The ``mooncake`` package or the system libraries it loads are missing."""


class RegionError(TransportError):
    """A write would land outside the peer's registered memory; it was not issued."""


def load_mooncake() -> Any:
    """The ``mooncake.engine`` module, or MooncakeUnavailable saying how to install it."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # read at import: no INFO lines per engine
    try:
        from mooncake import engine
    except (ImportError, OSError) as e:
        raise MooncakeUnavailable(
            f"the Mooncake Transfer Engine is not usable here ({e}); {INSTALL_HINT}"
        ) from e
    return engine


def mooncake_missing() -> str | None:
    """Why the Mooncake transport cannot run here (a skip reason), or None when it can."""
    try:
        load_mooncake()
    except MooncakeUnavailable as e:
        return str(e)
    return None


def _topology_hcas(topology: str) -> set[str]:
    """RDMA devices (HCAs) in the engine's topology: {location: [[preferred], [available]]}."""
    return {hca for lists in json.loads(topology).values() for names in lists for hca in names}


def check_protocol(mc: Any, te: Any, protocol: str, device: str) -> None:
    """Raise unless ``protocol`` is what the engine will really use (it falls back to TCP silently)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown Mooncake protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol in _NVLINK_FLAGS and not getattr(mc, _NVLINK_FLAGS[protocol], False):
        raise TransportError(
            f"Mooncake protocol {protocol!r}: this mooncake build has no {protocol} support "
            "(install mooncake-transfer-engine, the CUDA build, on GPU machines)"
        )
    if protocol != "rdma":
        return
    if os.environ.get("MC_FORCE_TCP"):
        raise TransportError("Mooncake protocol 'rdma' requested but MC_FORCE_TCP is set")
    found = _topology_hcas(te.get_local_topology())
    wanted = {d for d in device.split(",") if d}
    if not found or not wanted <= found:
        raise TransportError(
            f"Mooncake protocol 'rdma' requested (device {device or 'any'}) but the engine found RDMA "
            f"devices {sorted(found) or 'none'} (see /sys/class/infiniband); it would fall back to TCP. "
            "Use --mooncake-protocol tcp or name a device that exists with --mooncake-device"
        )


def _cap_timeouts(timeout_s: float) -> None:
    """Set the engine's timeouts for the next engine: ours, or the user's where that is shorter."""
    cap = max(1, int(timeout_s))
    for var, user in _USER_TIMEOUTS.items():
        os.environ[var] = str(min(cap, int(user)) if user.isdigit() else cap)


@dataclass(frozen=True)
class Region:
    """A registered span of memory: ``[addr, addr + nbytes)``."""

    addr: int
    nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> Region:
        return cls(t.data_ptr(), t.numel() * t.element_size())

    def contains(self, addr: int, nbytes: int) -> bool:
        return self.addr <= addr and addr + nbytes <= self.addr + self.nbytes


def check_bounds(regions: Sequence[Region], dsts: Sequence[int], lens: Sequence[int]) -> None:
    """RegionError unless every ``(dst, len)`` lies wholly inside one of ``regions``."""
    for dst, n in zip(dsts, lens):
        if not any(r.contains(dst, n) for r in regions):
            raise RegionError(
                f"write of {n} bytes at {dst:#x} is outside the peer's registered memory: refused"
            )


class MooncakeEngine:
    """One transfer endpoint (``session`` = host:port), shareable by several planes."""

    _process_protocol: str | None = None  # the engine's allocator is chosen once per process

    def __init__(
        self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "", timeout_s: float = 60.0
    ) -> None:
        mc = load_mooncake()
        self._mc = mc
        _cap_timeouts(timeout_s)
        self.te = mc.TransferEngine()
        check_protocol(mc, self.te, protocol, device)
        if MooncakeEngine._process_protocol not in (None, protocol):
            raise TransportError(
                f"Mooncake protocol {protocol!r} requested, but this process already runs "
                f"{MooncakeEngine._process_protocol!r} (the engine would keep that one)"
            )
        host = reachable_host(host)
        if self.te.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
            raise TransportError(f"Mooncake engine failed to start on {host} ({protocol}, device {device!r})")
        MooncakeEngine._process_protocol = protocol
        self.protocol = protocol
        self.session = f"{host}:{self.te.get_rpc_port()}"
        self._regions: list[Region] = []
        self._inbox: dict[str, deque[str]] = defaultdict(deque)

    def register(self, t: torch.Tensor) -> Region:
        """Register a tensor's memory (once; for the engine's lifetime or until ``unregister``)."""
        region = Region.of(t)
        if self.te.register_memory(region.addr, region.nbytes) != 0:
            raise TransportError(f"Mooncake could not register {region.nbytes} bytes at {region.addr:#x}")
        self._regions.append(region)
        return region

    def unregister(self, region: Region) -> None:
        self._regions.remove(region)
        self.te.unregister_memory(region.addr)

    def write(
        self,
        session: str,
        srcs: list[int],
        dsts: list[int],
        lens: list[int],
        peer_regions: Sequence[Region],
        notify: tuple[str, str] | None = None,
    ) -> None:
        """Write local ``srcs`` into the peer's ``dsts`` (checked against ``peer_regions`` first), then
        deliver ``notify`` (name, message) to the peer; with no data, only the notice goes."""
        check_bounds(self._regions, srcs, lens)
        check_bounds(peer_regions, dsts, lens)
        te, mc = self.te, self._mc
        op = mc.TransferOpcode.Write
        for i in range(0, len(lens), MAX_BATCH):
            part = slice(i, i + MAX_BATCH)
            note = mc.TransferNotify(*notify) if notify and part.stop >= len(lens) else None
            if te.batch_transfer_sync(session, srcs[part], dsts[part], lens[part], op, note) != 0:
                raise TransportError(f"Mooncake write of {sum(lens)} bytes to {session} failed")
        if notify and not lens:  # a zero-length write carries the notice (a batch needs an entry)
            src, dst = self._regions[0].addr, peer_regions[0].addr
            if te.transfer_sync(session, src, dst, 0, op, mc.TransferNotify(*notify)) != 0:
                raise TransportError(f"Mooncake notice to {session} failed")

    def take(self, name: str) -> list[str]:
        """Messages of the notices named ``name`` that arrived since the last call, in order."""
        for note in self.te.get_notifies():
            self._inbox[note.name].append(note.msg)
        box = self._inbox.pop(name, None)
        return list(box) if box else []

    def close(self) -> None:
        for region in list(self._regions):
            self.unregister(region)
