"""The shared-memory exchange with its slots on the GPU: CUDA IPC buffers, CUDA events for order.

UNPROVEN: written and CPU-checked only for import; ``test/test_shm_exchange.py``'s ``gpu`` tests
have not run on a device yet.

The host segment keeps the control words, the futex doorbells and the step metadata exactly as in
``shm_exchange``; only the q|k|v and output slots move to one device buffer the decode side
allocates and shares (its CUDA IPC handle travels in the offer, msgpack-able, no pickle). Each
side records an interprocess CUDA event on its current stream after writing a slot and rings the
host doorbell right away, without waiting for the GPU; the reader makes its current stream wait
on that event (``cudaStreamWaitEvent``: no host synchronisation), so host latency is the doorbell
and the GPU work is ordered by events. Slot reuse is safe by stream order: a side overwrites slot
*s* only after its stream waited for the peer's event on *s* of two requests earlier.

Not here yet: the executor's events cross back through the control page (``DEVICE_OFFSET``);
peers on different GPUs of one host rely on CUDA IPC's peer access; the host doorbell cannot sit
inside a CUDA graph (the paper's 2-D graphs need a device-side flag wait instead).
"""

from __future__ import annotations

import torch

from adrenaline.transport.base import TransportError
from adrenaline.transport.shm_exchange import ShmClientChannel
from adrenaline.transport.shm_segment import DEVICE_OFFSET, SLOTS, ShmLayout
from adrenaline.transport.shm_server import ShmExecutorChannel

HANDLE_BYTES = 64  # cudaIpcEventHandle_t


class _Events:
    """Per slot: the event this side records after writing, and the peer's it waits on."""

    def __init__(self) -> None:
        self.mine = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        self.theirs: list[torch.cuda.Event] = []

    def handles(self) -> list[bytes]:
        return [e.ipc_handle() for e in self.mine]

    def open(self, device: torch.device, handles: list[bytes]) -> None:
        self.theirs = [torch.cuda.Event.from_ipc_handle(device, h) for h in handles]


class _EventOrdered:
    """Slot order on the GPU: record after writing, make the current stream wait before reading."""

    events: _Events

    def _published(self, slot: int) -> None:
        self.events.mine[slot].record()

    def _landed(self, slot: int) -> None:
        torch.cuda.current_stream().wait_event(self.events.theirs[slot])


def _device_views(channel, data: torch.Tensor) -> None:
    channel.qkv, channel.out = channel.layout.slot_views(data)
    channel.data = data  # keeps the IPC allocation alive as long as the channel


class CudaIpcClientChannel(_EventOrdered, ShmClientChannel):
    """The decode side: allocates the device slots; q/k/v and outputs stay on its GPU."""

    @classmethod
    def create_on(cls, layout: ShmLayout, timeout_s: float, device: torch.device) -> CudaIpcClientChannel:
        if device.type != "cuda":
            raise TransportError("the CUDA IPC exchange needs a CUDA device")
        ch = cls.create(layout, timeout_s)
        size = layout.size - layout.data_offset
        _device_views(ch, torch.empty(size, dtype=torch.uint8, device=device))
        ch.events = _Events()
        return ch

    def offer(self) -> dict:
        share = list(self.data.untyped_storage()._share_cuda_())
        return {**super().offer(), "cuda": {"storage": share, "events": self.events.handles()}}

    def wait_attached(self, timeout_s: float) -> None:
        super().wait_attached(timeout_s)
        raw = bytes(self.mm[DEVICE_OFFSET : DEVICE_OFFSET + SLOTS * HANDLE_BYTES])
        self.events.open(
            self.data.device, [raw[i : i + HANDLE_BYTES] for i in range(0, len(raw), HANDLE_BYTES)]
        )


class CudaIpcExecutorChannel(_EventOrdered, ShmExecutorChannel):
    """The executor side: maps the decode side's device slots on ``device``."""

    @classmethod
    def attach_on(
        cls, offer: dict, peer: str, device: torch.device, heads: tuple[int, int, int] | None = None
    ) -> CudaIpcExecutorChannel:
        cuda = offer.get("cuda")
        if cuda is None:
            raise TransportError("the offer has no CUDA IPC buffers")
        with torch.cuda.device(device):
            ch = cls.attach(offer, peer, heads)
            try:
                storage = torch.UntypedStorage._new_shared_cuda(device.index or 0, *cuda["storage"][1:])
                _device_views(ch, torch.empty(0, dtype=torch.uint8, device=device).set_(storage))
                ch.events.open(device, cuda["events"])
            except Exception as e:
                ch.close()
                raise TransportError(f"cannot map the decode side's CUDA buffers: {e}") from e
        return ch

    def _attaching(self) -> None:
        self.events = _Events()
        raw = b"".join(self.events.handles())
        self.mm[DEVICE_OFFSET : DEVICE_OFFSET + len(raw)] = raw
