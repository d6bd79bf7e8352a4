"""The data plane a PD instance runs on, chosen once from ``--pd-transport``.

``tcp`` and ``nccl`` are transports: KV pages and per-layer tensors travel as their messages.
``mooncake`` keeps ZeroMQ as the control plane and moves data one-sided over one Mooncake Transfer
Engine per process: the instance's KV pool is registered once (``MooncakePages``), attention
executors on other hosts get the Mooncake offload exchange, and this prefill instance's executor
process runs an engine of its own to serve them. The engine checks at startup that it really runs
``--mooncake-protocol`` (it would fall back to TCP without a word) and caps its timeouts at
``--pd-timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline.kv_cache.pool import KVPool
from adrenaline.offload.exchange import AttentionExchange, TransportExchange
from adrenaline.offload.mooncake_exchange import MooncakeExchange
from adrenaline.offload.shm import ShmExchange
from adrenaline.server.args import AdrenalineArgs
from adrenaline.transport import Transport, create_transport
from adrenaline.transport.kv_pages import KVPageMover
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_pages import MooncakePages
from adrenaline.transport.shm_segment import ShmLayout


@dataclass
class DataPlane:
    transport: Transport  # control (and, for tcp/nccl, data) messages
    transport_args: tuple[str, str, str | None]  # ``create_transport``'s, for the executor process
    engine: MooncakeEngine | None = None
    engine_args: tuple[str, str, str, float] | None = None

    def mover(self, pool: KVPool) -> KVPageMover | None:
        """How this instance's KV pages travel (None: as messages over the transport)."""
        return MooncakePages(pool, self.engine) if self.engine is not None else None


def data_plane(ours: AdrenalineArgs, bind_host: str) -> DataPlane:
    mooncake = ours.pd_transport == "mooncake"
    transport_args = ("tcp" if mooncake else ours.pd_transport, bind_host, ours.pd_advertise_host)
    transport = create_transport(*transport_args)
    if not mooncake:
        return DataPlane(transport, transport_args)
    host = ours.pd_advertise_host or bind_host
    engine_args = (host, ours.mooncake_protocol, ours.mooncake_device, ours.pd_timeout)
    try:
        engine = MooncakeEngine(*engine_args)
    except BaseException:
        transport.close()
        raise
    return DataPlane(transport, transport_args, engine, engine_args)


def offload_exchange(
    ours: AdrenalineArgs, plane: DataPlane, heads: tuple[int, int, int], dtype: torch.dtype, rows: int, device
) -> AttentionExchange:
    """The decode side's per-layer data path: shared memory to executors on this host (on CPU),
    Mooncake (under ``--pd-transport mooncake``) or TCP to the others; ``--offload-exchange`` forces
    one. Shared-memory channels and Mooncake links hold ``rows`` (a larger group goes over TCP)."""
    if ours.offload_exchange == "tcp":
        return TransportExchange(plane.transport)
    remote = None
    if plane.engine is not None:
        args = (plane.transport, plane.engine, heads, dtype, rows, ours.offload_timeout, str(device))
        remote = MooncakeExchange(*args)
    if ours.offload_exchange == "mooncake" or (remote is not None and device.type != "cpu"):
        return remote
    if device.type != "cpu":
        return TransportExchange(plane.transport)
    layout = ShmLayout(rows, *heads, dtype)
    return ShmExchange(plane.transport, layout, ours.offload_timeout, ours.offload_exchange, remote)
