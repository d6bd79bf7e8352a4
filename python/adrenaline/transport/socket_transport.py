"""Host-memory transport on the standard library only (``multiprocessing.connection`` over TCP).

For where pyzmq is not installed (the engine core alone, e.g. on a bare GPU image): the same
``Transport`` contract as ``ZmqTransport``, peers connected lazily on first send, tensors staged
through host memory. One reader thread per incoming connection feeds one inbox; each outgoing peer
gets one connection, so messages to a peer stay in order. Slower than ZeroMQ per message (pickle,
threads); the per-layer GPU exchange does not use it (``runner/ipc_exchange.py``).
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch

from adrenaline.transport.base import (
    Message,
    Transport,
    TransportError,
    dtype_name,
    from_bytes,
    reachable_host,
    to_bytes,
)

SCHEME = "sock://"


class SocketTransport(Transport):
    def __init__(self, bind_host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        super().__init__()
        self._listener = Listener(("" if bind_host == "0.0.0.0" else bind_host, 0))
        self.address = f"{SCHEME}{advertise_host or reachable_host(bind_host)}:{self._listener.address[1]}"
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self._peers: dict[str, Connection] = {}
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="socket-transport-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    self._inbox.put(conn.recv_bytes())
                except (EOFError, OSError):
                    return

    def send(
        self, peer: str, kind: str, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        bufs = [to_bytes(t) for t in tensors]
        specs = [(dtype_name(t.dtype), list(t.shape)) for t in tensors]
        payload = pickle.dumps((self.address, kind, meta or {}, specs, [bytes(b) for b in bufs]))
        try:
            conn = self._peers.get(peer)
            if conn is None:
                host, port = peer.removeprefix(SCHEME).rsplit(":", 1)
                conn = self._peers[peer] = Client((host, int(port)))
            conn.send_bytes(payload)
        except OSError as e:
            self.disconnect(peer)
            raise TransportError(f"cannot send to {peer}: {e}") from e
        nbytes = sum(b.nbytes for b in bufs)
        self.stats.bytes_sent += nbytes
        self.stats.messages_sent += 1
        return nbytes

    def _receive(self, timeout_s: float) -> Message | None:
        try:
            data = self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None
        peer, kind, meta, specs, bufs = pickle.loads(data)
        tensors = [from_bytes(memoryview(b), d, s) for b, (d, s) in zip(bufs, specs)]
        self.stats.bytes_received += sum(len(b) for b in bufs)
        self.stats.messages_received += 1
        return Message(peer, kind, meta, tensors)

    def lost(self, peer: str) -> bool:
        """The peer never writes to the connection this side opened: readable means closed."""
        conn = self._peers.get(peer)
        try:
            return conn is not None and conn.poll(0)
        except OSError:
            return True

    def disconnect(self, peer: str) -> None:
        conn = self._peers.pop(peer, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._closed = True
        for peer in list(self._peers):
            self.disconnect(peer)
        self._listener.close()
