"""GPU-to-GPU transport: headers over ZeroMQ (the standard library's sockets where pyzmq is not
installed), tensor payloads over NCCL (NVLink, InfiniBand).

There is no global world. The first time an endpoint sends to a peer it opens a two-rank NCCL
communicator for that direction only: it serves a ``TCPStore`` as rank 0 and tells the peer where
(an ``nccl_init`` header); the peer joins as rank 1 when the header arrives. A peer that dies
takes only its own communicators with it; NCCL's own timeout (``timeout_s``) aborts an operation
stuck on a dead peer instead of hanging the process.

Each message's header travels first, so the receiver knows the shapes and posts matching
receives in order; payloads on one communicator are ordered like the headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from adrenaline.transport.base import Message, dtype_name

try:
    from adrenaline.transport.zmq_transport import ZmqTransport as HeaderTransport
except ImportError:  # the engine core without pyzmq: headers over the standard library
    from adrenaline.transport.socket_transport import SocketTransport as HeaderTransport

NCCL_INIT = "nccl_init"


class NcclTransport(HeaderTransport):
    def __init__(
        self, bind_host: str = "127.0.0.1", advertise_host: str | None = None, timeout_s: float = 60
    ) -> None:
        super().__init__(bind_host, advertise_host)
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl transport needs a CUDA GPU; use --pd-transport tcp")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = timedelta(seconds=timeout_s)
        self.host = self.address.split("://", 1)[-1].rsplit(":", 1)[0]
        self._out: dict[str, tuple[Any, Any]] = {}  # peer -> (store, group) where we are rank 0
        self._in: dict[str, tuple[Any, Any]] = {}  # peer -> (store, group) where we are rank 1

    def _group(self, store: Any, rank: int) -> Any:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = self.timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)

    def _sending_group(self, peer: str) -> Any:
        if peer not in self._out:
            store = dist.TCPStore(
                self.host, 0, 2, is_master=True, timeout=self.timeout, wait_for_workers=False
            )
            super().send(peer, NCCL_INIT, {"host": self.host, "port": store.port})
            self._out[peer] = (store, self._group(store, 0))
        return self._out[peer][1]

    def send(
        self, peer: str, kind: str, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        if not tensors:
            return super().send(peer, kind, meta)
        group = self._sending_group(peer)
        header = {
            **(meta or {}),
            "_nccl": [(dtype_name(t.dtype), list(t.shape)) for t in tensors],
        }
        super().send(peer, kind, header)
        nbytes = 0
        for t in tensors:
            t = t.to(self.device, non_blocking=True).contiguous()
            group.send([t], 1, 0)
            nbytes += t.numel() * t.element_size()
        self.stats.bytes_sent += nbytes
        return nbytes

    def _receive(self, timeout_s: float) -> Message | None:
        msg = super()._receive(timeout_s)
        if msg is None:
            return None
        if msg.kind == NCCL_INIT:
            store = dist.TCPStore(
                msg.meta["host"], msg.meta["port"], 2, is_master=False, timeout=self.timeout
            )
            self._in[msg.peer] = (store, self._group(store, 1))
            return self._receive(0)
        specs = msg.meta.pop("_nccl", None)
        if specs:
            group = self._in[msg.peer][1]
            for dtype, shape in specs:
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                group.recv([buf], 0, 0).wait()
                msg.tensors.append(buf)
                self.stats.bytes_received += buf.numel() * buf.element_size()
        return msg

    def disconnect(self, peer: str) -> None:
        for table in (self._out, self._in):
            entry = table.pop(peer, None)
            if entry is not None and hasattr(entry[1], "abort"):
                entry[1].abort()
        super().disconnect(peer)
