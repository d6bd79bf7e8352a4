"""Data plane between instances: tagged tensor messages to peers that come and go at run time.

Implementations import lazily: the engine core runs without pyzmq (``socket`` needs only the
standard library).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adrenaline.transport.base import Message, PeerTimeout, Transport, TransportError

if TYPE_CHECKING:
    from adrenaline.transport.zmq_transport import ZmqTransport

__all__ = ["Message", "PeerTimeout", "Transport", "TransportError", "ZmqTransport", "create_transport"]


def __getattr__(name: str):
    if name == "ZmqTransport":
        from adrenaline.transport.zmq_transport import ZmqTransport

        return ZmqTransport
    raise AttributeError(name)


def create_transport(kind: str, bind_host: str, advertise_host: str) -> Transport:
    """``tcp`` (host memory over ZeroMQ, any machine), ``nccl`` (GPU tensors over NCCL, metadata
    over tcp) or ``socket`` (host memory, standard library only)."""
    if kind == "tcp":
        from adrenaline.transport.zmq_transport import ZmqTransport

        return ZmqTransport(bind_host, advertise_host)
    if kind == "nccl":
        from adrenaline.transport.nccl_transport import NcclTransport

        return NcclTransport(bind_host, advertise_host)
    if kind == "socket":
        from adrenaline.transport.socket_transport import SocketTransport

        return SocketTransport(bind_host, advertise_host)
    raise ValueError(f"unknown transport {kind!r}: choose tcp, nccl or socket")
