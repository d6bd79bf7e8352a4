"""The executor side of the shared-memory exchange: attach to decode instances' channels and serve.

``ShmServer`` runs one thread per decode instance, so a slow or dead one never delays another.
Each thread sleeps on its channel's futex while idle (it polls, briefly, for ``spin_s``
after a request only: it shares cores with the prefill, which must get them whenever the executor
has nothing to compute; its raised priority, ``offload.process``, makes its wake-up preempt the
prefill instead), starts layer *l* as soon as its q|k|v lands, and leaves when the peer closes or dies,
or when the server closes. The work itself is two callables, so any executor can plug in:

- ``begin(meta) -> (used, total) | None``: once per step, before its first layer (also for
  frees-only messages, whose ``rooms`` are empty): apply ``meta.frees``, then plan; returns the
  executor's KV pages, which the decode side reads with the step's answers (its load view). Runs
  under ``ShmServer.lock``, which the executor also holds where else it changes pages. Raising
  makes every layer of that step answer with the error (the decode side recomputes those
  requests locally).
- ``attend(meta, layer, q, k, v) -> out``: [rows, H, D]. Runs concurrently for different decode
  instances. q/k/v are views on shared memory, valid until it returns.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable

import torch

from adrenaline.transport.base import TransportError
from adrenaline.transport.doorbell import MASK, SPIN_S, PeerWatch
from adrenaline.transport.shm_exchange import LAYER_NONE, ShmChannel, StepMeta
from adrenaline.transport.shm_segment import (
    PROTOCOL_VERSION,
    SLOTS,
    W_ATTACHER_PID,
    W_CREATOR_PID,
    W_META_FREES,
    W_META_ROWS,
    W_META_STEP,
    W_PAGES_TOTAL,
    W_PAGES_USED,
    ShmLayout,
    ShmLayoutError,
    check_header,
    open_segment,
    unlink,
)

logger = logging.getLogger(__name__)

Begin = Callable[[StepMeta], tuple[int, int] | None]
Attend = Callable[[StepMeta, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ShmExecutorChannel(ShmChannel):
    """The executor's end of one channel: reads requests in order and answers them."""

    def __init__(self, name: str, mm: mmap.mmap, layout: ShmLayout, peer: str) -> None:
        super().__init__(name, mm, layout, False, 0.0)
        self.peer_name, self.served, self.slot = peer, 0, 0
        self.step = StepMeta(peer, 0, [], [], [])  # the current step, from its metadata

    @classmethod
    def attach(cls, offer: dict, peer: str, heads: tuple[int, int, int] | None = None) -> ShmExecutorChannel:
        """Map the decode side's segment (from its ``offer``), check it, unlink its name."""
        if offer.get("version") != PROTOCOL_VERSION:
            raise ShmLayoutError(
                f"offer speaks protocol {offer.get('version')}, this side {PROTOCOL_VERSION}"
            )
        layout = ShmLayout.from_dict(offer["layout"])
        if heads is not None and heads != (layout.num_heads, layout.num_kv_heads, layout.head_dim):
            raise ShmLayoutError(f"offered heads {layout} do not match this executor's {heads}")
        try:
            ch = cls(offer["name"], open_segment(offer["name"], layout.size), layout, peer)
        except TransportError:
            unlink(offer["name"])
            raise
        try:
            check_header(ch.words, layout)
            ch.peer = PeerWatch(ch.words[W_CREATOR_PID])
            ch.check()
            ch.words[W_ATTACHER_PID] = os.getpid()
            ch._attaching()
            ch.attached.ring(1)
        except TransportError:
            ch.close()
            raise
        finally:
            unlink(ch.name)
        return ch

    def _attaching(self) -> None:
        """Before telling the decode side: a device variant leaves its handles in the segment."""

    def next_request(self) -> tuple[int, bool]:
        """Sleep until the next request; (its layer, whether it brought new step metadata)."""
        n = (self.served + 1) & MASK
        self.req.wait(n, None, self.check, self.spin_s)
        self.slot = n & 1
        no, layer, rows, fresh = self.read_request(self.slot)
        if no != n:
            raise ShmLayoutError(f"request {no} in the slot of request {n}: the peer broke protocol")
        if fresh:
            self._read_step()
        if rows != len(self.step.rooms):
            raise ShmLayoutError(f"request of {rows} rows in a step of {len(self.step.rooms)}")
        self._landed(self.slot)
        return layer, fresh

    def _read_step(self) -> None:
        w, L = self.words, self.layout
        n, f = w[W_META_ROWS], w[W_META_FREES]
        if n > L.max_rows or f > L.max_frees:
            raise ShmLayoutError(f"step of {n} rows and {f} frees exceeds the layout")
        m, r = self.meta.tolist(), L.max_rows
        self.step = StepMeta(self.peer_name, w[W_META_STEP], m[:n], m[r : r + n], m[2 * r : 2 * r + f])
        splits = [L.num_heads, L.num_kv_heads, L.num_kv_heads]
        self._views = [(*self.qkv[s][:n].split(splits, dim=1), self.out[s][:n]) for s in range(SLOTS)]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current request's q, k, v."""
        return self._views[self.slot][:3]

    def reply(self, out: torch.Tensor | None, error: str = "", attend_s: float = 0.0) -> None:
        """Answer the current request; ``attend_s``: the time its attention took (the decode side
        tells the exchange's own cost from the executor's with it)."""
        if out is not None and not error:
            view = self._views[self.slot][3]
            if out.shape != view.shape:
                raise ValueError(f"attention output {tuple(out.shape)}, expected {tuple(view.shape)}")
            view.copy_(out)
            self._published(self.slot)
        self.write_status(self.slot, error, attend_s)
        self.served = (self.served + 1) & MASK
        self.resp.ring(self.served)


class ShmServer:
    """Serves the channels of any number of decode instances, one sleeping thread each."""

    def __init__(
        self,
        attend: Attend,
        begin: Begin | None = None,
        on_close: Callable[[str], None] | None = None,
        device: torch.device | str = "cpu",
        spin_s: float = SPIN_S,
    ) -> None:
        """``device``: where attention runs; a CUDA one accepts CUDA IPC offers. ``spin_s``: how
        long a thread polls for the next layer before it sleeps. ``on_close(peer)``: the peer closed
        its channel or died (not called for channels this side replaced or removed)."""
        self.attend, self.begin, self.on_close = attend, begin, on_close
        self.device, self.spin_s = torch.device(device), spin_s
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lock = threading.Lock()  # held around ``begin``: take it too where else pages change
        self._channels: dict[str, tuple[ShmExecutorChannel, threading.Thread]] = {}

    def add(self, peer: str, offer: dict, heads: tuple[int, int, int] | None = None) -> None:
        """Attach to ``peer``'s channel (replacing an older one of it) and start serving it."""
        self.remove(peer)
        if "cuda" in offer:
            from adrenaline.transport.cuda_ipc_exchange import CudaIpcExecutorChannel

            ch: ShmExecutorChannel = CudaIpcExecutorChannel.attach_on(offer, peer, self.device, heads)
        else:
            ch = ShmExecutorChannel.attach(offer, peer, heads)
        ch.spin_s = self.spin_s
        thread = threading.Thread(target=self._serve, args=(ch,), name=f"shm-exchange {peer}", daemon=True)
        self._channels[peer] = (ch, thread)
        thread.start()

    def peers(self) -> list[str]:
        return sorted(p for p, (_, t) in list(self._channels.items()) if t.is_alive())

    def remove(self, peer: str, timeout_s: float = 5.0) -> None:
        entry = self._channels.pop(peer, None)
        if entry is not None:
            entry[0].shutdown()
            entry[1].join(timeout_s)

    def close(self) -> None:
        for peer in list(self._channels):
            self.remove(peer)

    def _serve(self, ch: ShmExecutorChannel) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread: where this channel's streams live
        error = ""  # why the current step cannot be served
        try:
            while True:
                layer, fresh = ch.next_request()
                if fresh:
                    error = self._begin(ch)
                if layer == LAYER_NONE or error:
                    ch.reply(None, error)
                    continue
                try:
                    tic = time.perf_counter()
                    out = self.attend(ch.step, layer, *ch.inputs())
                    ch.reply(out, attend_s=time.perf_counter() - tic)
                except TransportError:
                    raise
                except Exception as e:  # the decode side recomputes; the channel stays up
                    logger.exception("attention for %s failed", ch.peer_name)
                    ch.reply(None, f"{type(e).__name__}: {e}")
        except TransportError as e:
            logger.info("shared-memory channel of %s ends: %s", ch.peer_name, e)
        finally:
            ch.close()
            entry = self._channels.get(ch.peer_name)
            if entry is not None and entry[0] is ch:  # the peer left (not replaced, not removed)
                self._channels.pop(ch.peer_name, None)
                if self.on_close is not None:
                    self.on_close(ch.peer_name)

    def _begin(self, ch: ShmExecutorChannel) -> str:
        meta = ch.step
        if self.begin is None:
            return ""
        try:
            with self.lock:
                pages = self.begin(meta)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        if pages is not None:
            ch.words[W_PAGES_USED], ch.words[W_PAGES_TOTAL] = pages
        return ""
