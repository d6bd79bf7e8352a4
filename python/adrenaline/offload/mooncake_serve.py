"""Executor side of the Mooncake per-layer exchange: decode instances on other hosts write q|k|v
one-sided into buffers registered here and get each layer's output written back.

``MooncakeService`` attaches decode instances (their ``MooncakeOffer`` arrives over ZeroMQ) and
serves all of them on one thread, through the same begin/attend callbacks as the shared-memory
channels: a step's metadata plans it (under the executor's lock, where pages change), each layer's
q|k|v is attended and answered, frees release rooms. The thread polls the engine's notices
briskly while layers arrive and backs off when idle.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from adrenaline.transport.base import TransportError
from adrenaline.transport.mooncake_engine import MooncakeEngine
from adrenaline.transport.mooncake_offload import POLL_S, OffloadEndpoint, OffloadEvent, OffloadServer
from adrenaline.transport.shm_exchange import StepMeta
from adrenaline.transport.shm_server import Attend, Begin

logger = logging.getLogger(__name__)

IDLE_AFTER_S = 0.5  # without a notice for this long, poll every IDLE_POLL_S
IDLE_POLL_S = 0.005


class MooncakeService:
    def __init__(
        self,
        engine: MooncakeEngine,
        heads: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        begin: Begin,
        attend: Attend,
        lock: threading.Lock,
    ) -> None:
        self.server = OffloadServer(engine, heads, dtype, str(device))
        self.begin, self.attend, self.pages_lock = begin, attend, lock
        self._lock = threading.Lock()  # the server's links: attached here, served on the thread
        self._steps: dict[str, StepMeta] = {}
        self._errors: dict[str, str] = {}  # peer -> why its current step cannot be served ("": it can)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, decode: OffloadEndpoint) -> OffloadEndpoint:
        """Buffers for a decode instance; its answer (our endpoint) goes back over ZeroMQ."""
        with self._lock:
            mine = self.server.attach(decode)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="mooncake-exchange", daemon=True)
            self._thread.start()
        return mine

    def peers(self) -> list[str]:
        return sorted(self.server.links)

    def _serve(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                events = self.server.poll()
                for e in events:
                    self._handle(e)
            now = time.monotonic()
            last = now if events else last
            time.sleep(POLL_S if now - last < IDLE_AFTER_S else IDLE_POLL_S)

    def _handle(self, e: OffloadEvent) -> None:
        m, peer = e.meta, f"mooncake:{e.peer}"
        if m["kind"] == "free":
            self._begin(StepMeta(peer, -1, [], [], m["rooms"]))
        elif m["kind"] == "step":
            meta = StepMeta(peer, m["step"], m["rooms"], m["seq_lens"], m["frees"])
            self._steps[peer], self._errors[peer] = meta, self._begin(meta)
        else:
            out, error = self._attend(peer, m, e.qkv)
            try:
                if out is not None:
                    self.server.reply(e.peer, m["step"], m["layer"], out)
                else:
                    self.server.error(e.peer, m["step"], m["layer"], error)
            except TransportError as ex:
                logger.warning("decode instance %s unreachable: %s", e.peer, ex)

    def _begin(self, meta: StepMeta) -> str:
        """Apply frees and plan the step (where pages change: under the executor's lock)."""
        try:
            with self.pages_lock:
                self.begin(meta)
        except Exception as ex:
            return f"{type(ex).__name__}: {ex}"
        return ""

    def _attend(self, peer: str, m: dict, qkv: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        meta, error = self._steps.get(peer), self._errors.get(peer, "")
        if meta is None or meta.step != m["step"]:
            return None, f"step {m['step']} was not announced"
        if error:
            return None, error
        h, hkv, _ = self.server.heads
        try:
            return self.attend(meta, m["layer"], *qkv.split([h, hkv, hkv], dim=1)), ""
        except Exception as ex:  # the decode side recomputes; the link stays up
            logger.exception("attention for %s failed", peer)
            return None, f"{type(ex).__name__}: {ex}"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.server.close()
