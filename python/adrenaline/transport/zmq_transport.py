"""Host-memory transport over ZeroMQ TCP: the CPU data plane, and the metadata path of the GPU one.

Each endpoint binds one ROUTER socket (everything it receives) and opens one DEALER per peer it
sends to, whose identity is this endpoint's address, so receivers know whom to answer. A frame
list is ``[header, *tensor bytes]``; the header (msgpack) holds kind, metadata and each tensor's
dtype and shape. Device tensors are staged through host memory. Each DEALER has a monitor: a
connection that was up and then closed means the peer's process is gone (``lost``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from adrenaline.transport.base import (
    Message,
    Transport,
    TransportError,
    dtype_name,
    from_bytes,
    reachable_host,
    to_bytes,
)

SEND_HWM = 1024  # messages queued per peer before send() reports the peer as stuck


class ZmqTransport(Transport):
    def __init__(self, bind_host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        super().__init__()
        self.ctx = zmq.Context()
        # Lingering nowhere, libzmq's own sockets (each DEALER's monitor) included: a transport
        # dropped without close() is then terminated by the garbage collector at once instead of
        # blocking it (and the thread it runs in) forever on an undelivered monitor event.
        self.ctx.set(zmq.BLOCKY, 0)
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its address
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port(f"tcp://{'*' if bind_host in ('0.0.0.0', '') else bind_host}")
        self.address = f"tcp://{advertise_host or reachable_host(bind_host)}:{port}"
        self._peers: dict[str, zmq.Socket] = {}
        self._monitors: dict[str, zmq.Socket] = {}  # peer -> its DEALER's connection events
        self._down: set[str] = set()  # peers whose connection closed and did not come back

    @property
    def pollable(self) -> zmq.Socket:
        """What a ``zmq.Poller`` waits on for incoming messages."""
        return self.socket

    def _dealer(self, peer: str) -> zmq.Socket:
        sock = self._peers.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.address.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            self._monitors[peer] = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(peer)
            self._peers[peer] = sock
        return sock

    def lost(self, peer: str) -> bool:
        mon = self._monitors.get(peer)
        while mon is not None and mon.poll(0):
            if recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                self._down.add(peer)
            else:
                self._down.discard(peer)
        return peer in self._down

    def send(
        self, peer: str, kind: str, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        header = {
            "kind": kind,
            "meta": meta or {},
            "tensors": [(dtype_name(t.dtype), list(t.shape)) for t in tensors],
        }
        bufs = [to_bytes(t) for t in tensors]
        try:
            self._dealer(peer).send_multipart(
                [msgspec.msgpack.encode(header), *bufs], flags=zmq.NOBLOCK, copy=False
            )
        except zmq.Again as e:
            raise TransportError(f"peer {peer} is not draining its queue") from e
        nbytes = sum(b.nbytes for b in bufs)
        self.stats.bytes_sent += nbytes
        self.stats.messages_sent += 1
        return nbytes

    def _receive(self, timeout_s: float) -> Message | None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        ident, head, *frames = self.socket.recv_multipart(copy=False)
        header = msgspec.msgpack.decode(head.bytes)
        tensors = [from_bytes(f.buffer, d, s) for f, (d, s) in zip(frames, header["tensors"])]
        self.stats.bytes_received += sum(f.buffer.nbytes for f in frames)
        self.stats.messages_received += 1
        return Message(ident.bytes.decode(), header["kind"], header["meta"], tensors)

    def disconnect(self, peer: str) -> None:
        sock, mon = self._peers.pop(peer, None), self._monitors.pop(peer, None)
        self._down.discard(peer)
        if sock is not None:
            sock.disable_monitor()
            sock.close(linger=0)
        if mon is not None:
            mon.close(linger=0)

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def close(self) -> None:
        for peer in list(self._peers):
            self.disconnect(peer)
        self.socket.close(linger=0)
        self.ctx.term()
