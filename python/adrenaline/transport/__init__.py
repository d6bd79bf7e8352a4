"""Data plane between instances: tagged tensor messages to peers that come and go at run time."""

from adrenaline.transport.base import Message, PeerTimeout, Transport, TransportError
from adrenaline.transport.zmq_transport import ZmqTransport

__all__ = ["Message", "PeerTimeout", "Transport", "TransportError", "ZmqTransport", "create_transport"]


def create_transport(kind: str, bind_host: str, advertise_host: str) -> Transport:
    """``tcp`` (host memory, any machine) or ``nccl`` (GPU tensors over NCCL, metadata over tcp)."""
    if kind == "tcp":
        return ZmqTransport(bind_host, advertise_host)
    if kind == "nccl":
        from adrenaline.transport.nccl_transport import NcclTransport

        return NcclTransport(bind_host, advertise_host)
    raise ValueError(f"unknown transport {kind!r}: choose tcp or nccl")
