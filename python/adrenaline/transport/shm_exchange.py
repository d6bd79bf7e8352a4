"""Same-host per-layer attention exchange over shared memory: one channel per (decode, executor).

The decode side creates the channel (``ShmClientChannel.create``) sized for its largest offloaded
batch, hands ``offer()`` to the executor over the control plane, and the executor attaches
(``shm_server``). Per step, ``begin`` writes the rows' rooms, lengths and a batch of frees into
the metadata area; they travel with layer 0's doorbell. Per layer, ``submit`` packs q|k|v into the
layer's slot (layers alternate between two slots) and rings; ``wait`` returns the attention
output as a view on the slot, valid until the second ``submit`` after it. No pickling, no socket,
no buffer allocation per layer.

A batch larger than the buffers is refused (``BatchTooLarge``) before anything is written. A dead
or closed peer, or one that does not answer within ``timeout_s``, raises ``TransportError`` and
breaks the channel (the executor may still write into it): the caller recomputes locally and
re-handshakes or falls back to TCP. An error the executor reports leaves the channel usable.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adrenaline.transport.base import PeerTimeout, TransportError
from adrenaline.transport.doorbell import MASK, SPIN_S, Doorbell, PeerWatch, reached, supported
from adrenaline.transport.shm_segment import (
    CONTROL_BYTES,
    ERR_BYTES,
    ERR_OFFSET,
    PROTOCOL_VERSION,
    S_ATTEND_US,
    S_ERRLEN,
    S_LAYER,
    S_META,
    S_NO,
    S_ROWS,
    S_STATUS,
    S_STEP,
    SLOT_WORDS,
    SLOTS,
    W_ATTACHED,
    W_ATTACHER_PID,
    W_CLOSED,
    W_META_FREES,
    W_META_ROWS,
    W_META_STEP,
    W_PAGES_TOTAL,
    W_PAGES_USED,
    W_REQ,
    W_RESP,
    W_SLOT,
    BatchTooLarge,
    ShmLayout,
    create_segment,
    unlink,
    write_header,
)

LAYER_NONE = MASK  # a request that only carries metadata (frees)
# The decode side polls this long for an output before it sleeps: it waits within a step, on a core
# its scheduler owns, and a futex sleep costs a wake-up (tens of microseconds on a VM) on every
# layer. The executor polls only ``SPIN_S``: its cores are the prefill's.
WAIT_SPIN_S = 0.001


@dataclass
class StepMeta:
    """What the executor learns once per step, with layer 0 (or alone, for frees)."""

    peer: str  # which decode instance (the name given at attach)
    step: int
    rooms: list[int]
    seq_lens: list[int]  # KV length of each row after this step's token
    frees: list[int]  # rooms to release before this step


class ShmChannel:
    """What both ends share: the mapping, tensor views on it, the doorbells, the peer's liveness."""

    def __init__(self, name: str, mm: mmap.mmap, layout: ShmLayout, creator: bool, timeout_s: float) -> None:
        self.name, self.mm, self.layout, self.creator = name, mm, layout, creator
        self.timeout_s, self.spin_s = timeout_s, WAIT_SPIN_S if creator else SPIN_S
        self.words = memoryview(mm)[:CONTROL_BYTES].cast("I")
        self._anchor = ctypes.c_char.from_buffer(mm)  # the mapping's address, for the futex calls
        base = ctypes.addressof(self._anchor)
        self.attached, self.req, self.resp = (
            Doorbell(self.words, base, w) for w in (W_ATTACHED, W_REQ, W_RESP)
        )
        self.peer: PeerWatch | None = None
        self.closing = self.unmapped = False
        self._mine, self._theirs = (W_CLOSED, W_CLOSED + 1) if creator else (W_CLOSED + 1, W_CLOSED)
        self.meta = torch.frombuffer(mm, dtype=torch.int64, count=layout.meta_items, offset=CONTROL_BYTES)
        data = torch.frombuffer(mm, dtype=torch.uint8, offset=layout.data_offset)
        self.qkv, self.out = layout.slot_views(data)
        self._views: list[tuple[torch.Tensor, ...]] = []  # per slot: this step's rows of qkv/out

    def _published(self, slot: int) -> None:
        """After this side wrote ``slot``'s data, before it rings (a device variant records an event)."""

    def _landed(self, slot: int) -> None:
        """After the peer rang, before this side reads ``slot`` (a device variant waits on an event)."""

    # ---- a slot's words: the request (decode side writes) and its status (executor writes) ----
    def read_request(self, slot: int) -> tuple[int, int, int, bool]:
        """(request number, layer, rows, whether it brings new step metadata)."""
        w, b = self.words, W_SLOT + slot * SLOT_WORDS
        return w[b + S_NO], w[b + S_LAYER], w[b + S_ROWS], bool(w[b + S_META])

    def write_status(self, slot: int, error: str, attend_s: float = 0.0) -> None:
        b = W_SLOT + slot * SLOT_WORDS
        self.words[b + S_ATTEND_US] = min(round(attend_s * 1e6), MASK)
        if error:
            text = error.encode()[:ERR_BYTES]
            off = ERR_OFFSET + slot * ERR_BYTES
            self.mm[off : off + len(text)] = text
            self.words[b + S_ERRLEN] = len(text)
        self.words[b + S_STATUS] = 1 if error else 0

    def read_error(self, slot: int) -> str:
        """The executor's error for the slot's request, or ""."""
        b = W_SLOT + slot * SLOT_WORDS
        if not self.words[b + S_STATUS]:
            return ""
        off = ERR_OFFSET + slot * ERR_BYTES
        return bytes(self.mm[off : off + min(self.words[b + S_ERRLEN], ERR_BYTES)]).decode(errors="replace")

    def check(self) -> None:
        """Raise if waiting on the peer is pointless (run between sleeps)."""
        if self.closing:
            raise TransportError("the channel is closing")
        if self.words[self._theirs]:
            raise TransportError("the peer closed the shared-memory channel")
        if self.peer is not None and not self.peer.alive():
            raise TransportError(f"the peer process {self.peer.pid} is gone")

    def shutdown(self) -> None:
        """Tell the peer and this side's waiter (both wake and raise); safe from any thread."""
        if self.closing:
            return
        self.closing = True
        self.words[self._mine] = 1
        for bell in (self.req, self.resp, self.attached):
            bell.wake()
        unlink(self.name)

    def close(self) -> None:
        """``shutdown``, then unmap where no view escaped; by the thread that uses the channel."""
        if self.unmapped:
            return
        self.shutdown()
        self.unmapped = True
        if self.peer is not None:
            self.peer.close()
        self._views = []
        del self.meta, self.qkv, self.out, self.attached, self.req, self.resp, self._anchor
        self.words.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds an output view: the mapping goes with it


class ShmClientChannel(ShmChannel):
    """The decode side: creates the segment and drives the exchange."""

    def __init__(self, name: str, mm: mmap.mmap, layout: ShmLayout, timeout_s: float) -> None:
        super().__init__(name, mm, layout, True, timeout_s)
        self.broken = ""  # why the channel cannot be used any more
        self.posted, self.step, self.rows = 0, 0, 0
        self._meta_pending = False
        self._slot_layer: list[int | None] = [None, None]  # the layer each slot carries this step
        self._slot_no = [0, 0]  # its request number
        self._shapes = (torch.Size((0,)),) * 2
        self.attend_s = 0.0  # the executor's compute time for the output ``wait`` last returned

    @classmethod
    def create(cls, layout: ShmLayout, timeout_s: float) -> ShmClientChannel:
        """A new segment sized for ``layout``; ``timeout_s`` bounds every wait on the executor."""
        if not supported():
            raise TransportError("the shared-memory exchange needs Linux on x86-64")
        name, mm = create_segment(layout.size)
        ch = cls(name, mm, layout, timeout_s)
        write_header(ch.words, layout)
        return ch

    def offer(self) -> dict:
        """What the executor needs to attach (msgpack-able; send it over the control plane)."""
        return {"version": PROTOCOL_VERSION, "name": self.name, "layout": self.layout.to_dict()}

    def wait_attached(self, timeout_s: float) -> None:
        """Until the executor attached; the segment's name is gone from ``/dev/shm`` afterwards."""
        try:
            self.attached.wait(1, time.monotonic() + timeout_s, self.check)
        except TransportError:
            self.close()
            raise
        finally:
            unlink(self.name)
        self.peer = PeerWatch(self.words[W_ATTACHER_PID])

    # ---- per step -------------------------------------------------------------------------------
    def begin(
        self, step: int, rooms: Sequence[int], seq_lens: Sequence[int], frees: Sequence[int] = ()
    ) -> int:
        """Announce the step's rows (sent with layer 0); returns how many of ``frees`` it carries."""
        self._usable()
        L, n = self.layout, len(rooms)
        if n > L.max_rows:
            raise BatchTooLarge(f"{n} offloaded rows; the shared-memory channel holds {L.max_rows}")
        if len(seq_lens) != n:
            raise ValueError(f"{n} rooms but {len(seq_lens)} seq lens")
        self._wait_resp(self.posted)  # the executor has read the previous metadata
        taken = min(len(frees), L.max_frees)
        m, r = self.meta, L.max_rows
        m[:n] = torch.as_tensor(list(rooms), dtype=torch.int64)
        m[r : r + n] = torch.as_tensor(list(seq_lens), dtype=torch.int64)
        m[2 * r : 2 * r + taken] = torch.as_tensor(list(frees[:taken]), dtype=torch.int64)
        w = self.words
        w[W_META_STEP], w[W_META_ROWS], w[W_META_FREES] = step & MASK, n, taken
        self.step, self.rows, self._meta_pending = step & MASK, n, True
        self._slot_layer = [None, None]
        h, hkv, d = L.num_heads, L.num_kv_heads, L.head_dim
        self._shapes = (torch.Size((n, h, d)), torch.Size((n, hkv, d)))
        self._views = [(self.qkv[s][:n], self.out[s][:n]) for s in range(SLOTS)]
        return taken

    def post_frees(self, frees: Sequence[int]) -> int:
        """Send frees now, outside a step (the executor gets an empty step); how many went."""
        taken = self.begin(self.step, [], [], frees)
        self._post(LAYER_NONE)
        return taken

    # ---- per layer ------------------------------------------------------------------------------
    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._usable()
        qs, kvs = self._shapes
        if q.shape != qs or k.shape != kvs or v.shape != kvs:
            raise ValueError(f"q/k/v {tuple(q.shape)}/{tuple(k.shape)} do not match the step's {tuple(qs)}")
        n = (self.posted + 1) & MASK
        self._wait_resp(n - 2)  # the slot's previous request is answered
        qkv = self._views[n & 1][0]
        dev = qkv.device
        if q.device == dev and k.device == dev and v.device == dev:
            torch.cat((q, k, v), dim=1, out=qkv)  # casts to the channel's dtype if need be
        else:  # one copy each, across devices
            h, hkv = qs[1], kvs[1]
            qkv[:, :h].copy_(q)
            qkv[:, h : h + hkv].copy_(k)
            qkv[:, h + hkv :].copy_(v)
        self._published(n & 1)
        self._post(layer)

    def _post(self, layer: int) -> None:
        n = (self.posted + 1) & MASK
        s, w = n & 1, self.words
        b = W_SLOT + s * SLOT_WORDS
        w[b + S_NO], w[b + S_LAYER], w[b + S_ROWS], w[b + S_STEP] = n, layer & MASK, self.rows, self.step
        w[b + S_META] = self._meta_pending
        self._meta_pending = False
        self._slot_layer[s], self._slot_no[s] = layer, n
        self.posted = n
        self.req.ring(n)

    def wait(self, layer: int) -> torch.Tensor:
        """The layer's attention output, [rows, H, D]: a view on the slot (copy it to keep it)."""
        self._usable()
        s = 0 if self._slot_layer[0] == layer else 1
        if self._slot_layer[s] != layer:
            raise ValueError(f"layer {layer} was not submitted in this step")
        self._wait_resp(self._slot_no[s])
        error = self.read_error(s)
        if error:
            raise TransportError(f"attention executor: {error}")
        self.attend_s = self.words[W_SLOT + s * SLOT_WORDS + S_ATTEND_US] * 1e-6
        self._landed(s)
        return self._views[s][1]

    def pages(self) -> tuple[int, int] | None:
        """The executor's (used, total) KV pages as it reported them at its last step, if it did."""
        used, total = self.words[W_PAGES_USED], self.words[W_PAGES_TOTAL]
        return (used, total) if total else None

    def peer_gone(self) -> bool:
        """Whether the executor's process has exited (no wait: a pidfd poll)."""
        return self.peer is not None and not self.peer.alive()

    # ---- failure --------------------------------------------------------------------------------
    def _usable(self) -> None:
        if self.closing:
            raise TransportError("the shared-memory channel is closed")
        if self.broken:
            raise TransportError(f"shared-memory channel unusable: {self.broken}")

    def _wait_resp(self, n: int) -> None:
        if reached(self.resp.value, n):
            return
        try:
            self.resp.wait(n, time.monotonic() + self.timeout_s, self.check, self.spin_s)
        except PeerTimeout as e:
            self.broken = f"no answer within {self.timeout_s:.3g} s"
            raise PeerTimeout(f"attention executor: {self.broken}") from e
        except TransportError as e:
            self.broken = str(e)
            raise
