"""The per-layer attention offload exchange over the Mooncake Transfer Engine.

The decode side (``OffloadLink``, one per executor) writes each layer's packed q|k|v one-sided
into a buffer the executor registered for it, and the executor (``OffloadServer``) writes the
attention output back into the decode side's registered output buffer. A notice per write is the
doorbell: it carries the step, the layer and the row count, so the receiver knows the data has
landed. The per-step metadata (rooms, lengths) and frees travel as notices alone. Both buffers are
sized once for ``max_rows`` offloaded requests, so a step costs no registration.

Notices of one sender share one name (``attn@<sender session>``) and keep their order; a message is
a small JSON object whose ``kind`` is one of step, qkv, free, out, error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from adrenaline.transport.base import PeerTimeout, TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine, Region

OFFLOAD_VERSION = 1
POLL_S = 0.0002  # between notice polls while waiting for a layer's output


class OffloadEndpoint(msgspec.Struct, frozen=True):
    """A side's registered receive buffer: q|k|v rows on the executor, output rows on the decode side."""

    version: int
    session: str
    addr: int
    nbytes: int
    max_rows: int
    heads: tuple[int, int, int]  # query heads, kv heads, head dim
    dtype: str


def _channel(session: str) -> str:
    return f"attn@{session}"


@dataclass
class _Buffers:
    """A registered send buffer and receive buffer of one link, and the peer's endpoint."""

    send: torch.Tensor
    recv: torch.Tensor
    regions: tuple[Region, Region]
    peer: OffloadEndpoint | None = None


class _Side:
    """What both ends share: buffer shapes, registration, the doorbell write, notice reading."""

    def __init__(
        self, engine: MooncakeEngine, heads: tuple[int, int, int], dtype: torch.dtype, device: str
    ) -> None:
        self.engine, self.heads, self.dtype, self.device = engine, tuple(heads), dtype, device
        h, hkv, d = heads
        self.qkv_row, self.out_row = (h + 2 * hkv, d), (h, d)

    def _buffers(self, rows: int, send_row: tuple[int, int], recv_row: tuple[int, int]) -> _Buffers:
        send = torch.empty((rows, *send_row), dtype=self.dtype, device=self.device)
        recv = torch.empty((rows, *recv_row), dtype=self.dtype, device=self.device)
        return _Buffers(send, recv, (self.engine.register(send), self.engine.register(recv)))

    def _endpoint(self, b: _Buffers) -> OffloadEndpoint:
        r = b.regions[1]
        dtype = str(self.dtype).removeprefix("torch.")
        return OffloadEndpoint(
            OFFLOAD_VERSION, self.engine.session, r.addr, r.nbytes, len(b.recv), self.heads, dtype
        )

    def _check(self, peer: OffloadEndpoint) -> None:
        mine = (OFFLOAD_VERSION, self.heads, str(self.dtype).removeprefix("torch."))
        if (peer.version, tuple(peer.heads), peer.dtype) != mine:
            raise TransportError(
                f"offload peer {peer.session}: version/heads/dtype {peer.version, peer.heads, peer.dtype}, "
                f"expected {mine}"
            )

    def _send(self, b: _Buffers, rows: torch.Tensor | None, meta: dict[str, Any]) -> None:
        """Write ``rows`` into the peer's receive buffer (if any), ringing with ``meta``."""
        assert b.peer is not None
        srcs, dsts, lens = [], [], []
        if rows is not None:
            n = rows.shape[0]
            b.send[:n].copy_(rows)
            if b.send.is_cuda:  # the engine reads the buffer itself: the copy must have finished
                torch.cuda.current_stream(b.send.device).synchronize()
            srcs, dsts, lens = [b.regions[0].addr], [b.peer.addr], [b.send[:n].nbytes]
            meta = {**meta, "rows": n}
        note = (_channel(self.engine.session), msgspec.json.encode(meta).decode())
        self.engine.write(b.peer.session, srcs, dsts, lens, [Region(b.peer.addr, b.peer.nbytes)], note)

    def _notices(self, peer: str) -> list[dict[str, Any]]:
        return [msgspec.json.decode(m) for m in self.engine.take(_channel(peer))]

    def _release(self, b: _Buffers) -> None:
        for region in b.regions:
            self.engine.unregister(region)


class OffloadLink(_Side):
    """Decode side, one executor: begin a step, submit a layer's q|k|v, wait for its output, free."""

    def __init__(
        self,
        engine: MooncakeEngine,
        heads: tuple[int, int, int],
        dtype: torch.dtype,
        max_rows: int,
        device: str = "cpu",
    ) -> None:
        super().__init__(engine, heads, dtype, device)
        self.bufs = self._buffers(max_rows, self.qkv_row, self.out_row)
        self.step = 0
        self.executor = ""  # the executor's session once connected

    def endpoint(self) -> OffloadEndpoint:
        """Sent to the executor (control plane) for ``OffloadServer.attach``."""
        return self._endpoint(self.bufs)

    def connect(self, executor: OffloadEndpoint) -> None:
        self._check(executor)
        if executor.max_rows < len(self.bufs.send):
            raise TransportError(
                f"executor {executor.session} takes {executor.max_rows} rows, need {len(self.bufs.send)}"
            )
        self.bufs.peer, self.executor = executor, executor.session

    def begin(self, step: int, meta: dict[str, Any]) -> None:
        """Start a step: its metadata (rooms, lengths, frees) reaches the executor before any layer."""
        self.step = step
        self._send(self.bufs, None, {**meta, "kind": "step", "step": step})

    def submit(self, layer: int, qkv: torch.Tensor) -> None:
        """The layer's packed q|k|v, ``[rows, H + 2 Hkv, D]``, into the executor's buffer."""
        if qkv.shape[0] > len(self.bufs.send):
            raise ValueError(f"{qkv.shape[0]} offloaded rows, the link holds {len(self.bufs.send)}")
        self._send(self.bufs, qkv, {"kind": "qkv", "step": self.step, "layer": layer})

    def wait(self, layer: int, timeout_s: float) -> torch.Tensor:
        """The layer's output ``[rows, H, D]`` (a copy); PeerTimeout or TransportError otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self._notices(self.executor):
                if m.get("step") != self.step or m.get("layer") != layer:
                    continue  # a late answer to a step that already failed
                if m["kind"] == "error":
                    raise TransportError(f"attention executor {self.executor}: {m.get('message')}")
                return self.bufs.recv[: m["rows"]].clone()
            time.sleep(POLL_S)
        raise PeerTimeout(
            f"attention executor {self.executor} did not answer layer {layer} within {timeout_s:.1f} s"
        )

    def free(self, rooms: list[int]) -> None:
        self._send(self.bufs, None, {"kind": "free", "rooms": rooms})

    def close(self) -> None:
        self._release(self.bufs)


@dataclass
class OffloadEvent:
    peer: str  # the decode side's session: answer with ``reply``/``error``
    meta: dict[str, Any]  # kind: step (with the step's metadata), qkv (step, layer, rows) or free (rooms)
    qkv: torch.Tensor | None = None  # for qkv: a view of the receive buffer, valid until the reply


class OffloadServer(_Side):
    """Executor side: a receive buffer per attached decode side, events in arrival order, replies."""

    def __init__(
        self, engine: MooncakeEngine, heads: tuple[int, int, int], dtype: torch.dtype, device: str = "cpu"
    ):
        super().__init__(engine, heads, dtype, device)
        self.links: dict[str, _Buffers] = {}

    def attach(self, decode: OffloadEndpoint) -> OffloadEndpoint:
        """Buffers for a decode side's rows; the answer goes back to it for ``OffloadLink.connect``."""
        self._check(decode)
        self.detach(decode.session)
        b = self._buffers(decode.max_rows, self.out_row, self.qkv_row)
        b.peer = decode
        self.links[decode.session] = b
        return self._endpoint(b)

    def detach(self, peer: str) -> None:
        b = self.links.pop(peer, None)
        if b is not None:
            self._release(b)

    def poll(self) -> list[OffloadEvent]:
        events = []
        for peer, b in self.links.items():
            for m in self._notices(peer):
                qkv = b.recv[: m["rows"]] if m["kind"] == "qkv" else None
                events.append(OffloadEvent(peer, m, qkv))
        return events

    def reply(self, peer: str, step: int, layer: int, out: torch.Tensor) -> None:
        self._send(self.links[peer], out, {"kind": "out", "step": step, "layer": layer})

    def error(self, peer: str, step: int, layer: int, message: str) -> None:
        self._send(
            self.links[peer], None, {"kind": "error", "step": step, "layer": layer, "message": message}
        )

    def close(self) -> None:
        for peer in list(self.links):
            self.detach(peer)
