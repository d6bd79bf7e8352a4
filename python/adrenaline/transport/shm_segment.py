"""The shared-memory segment of one exchange channel: its layout, its header, its name's lifetime.

A segment lives in ``/dev/shm`` only between ``create`` and the peer's ``attach``: whichever side
attaches second unlinks the name, and the mapping lives on until both sides unmap it (or die), so
no file outlives a SIGKILL after the handshake. A creator killed before anyone attached leaves a
file named after its pid; ``reap_stale`` (run by every ``create``) removes those of dead pids.

Memory map: a 4 KiB control page (32-bit words, ``W_*``; error texts at ``ERR_OFFSET``), the step
metadata (int64 rooms, seq lens, frees), then per slot (two: layers alternate) the packed q|k|v
rows and the attention output rows, each sized for ``max_rows``.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
from dataclasses import asdict, dataclass

import torch

from adrenaline.transport.base import TransportError

PROTOCOL_VERSION = 1
MAGIC = 0x58524441  # "ADRX"
SHM_DIR = "/dev/shm"
PREFIX = "adrenaline-x"
NAME = re.compile(rf"{PREFIX}-(\d+)-[0-9a-f]+")
DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
SLOTS = 2
CONTROL_BYTES, ERR_OFFSET, ERR_BYTES = 4096, 1024, 256
DEVICE_OFFSET = 2048  # to CONTROL_BYTES: reserved for a device variant's handles (cuda_ipc_exchange)

# control words; a doorbell's counter is followed by its sleep flag
W_MAGIC, W_VERSION, W_LAYOUT = 0, 1, 2  # W_LAYOUT..W_LAYOUT+5: ShmLayout.words()
W_CREATOR_PID, W_ATTACHER_PID = 8, 9
W_CLOSED = 10  # W_CLOSED + 0: the creator closed, + 1: the attacher closed (one writer per word)
W_ATTACHED, W_REQ, W_RESP = 12, 14, 16  # doorbells: attach done, requests posted, responses done
W_META_STEP, W_META_ROWS, W_META_FREES = 18, 19, 20
W_PAGES_USED, W_PAGES_TOTAL = 21, 22  # the executor's KV pages after its last step began (0 total: none)
W_SLOT, SLOT_WORDS = 24, 8  # per slot, below
S_NO, S_LAYER, S_ROWS, S_STEP, S_META, S_STATUS, S_ERRLEN, S_ATTEND_US = range(8)


class ShmLayoutError(TransportError):
    """The peer's segment does not match what this side expects (protocol version or sizes)."""


class BatchTooLarge(TransportError):
    """More rows than the channel's buffers hold: the caller keeps those requests local."""


@dataclass(frozen=True)
class ShmLayout:
    max_rows: int  # offloaded requests per step (one decode row each)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    max_frees: int = 256  # freed rooms carried per step; the rest wait for the next one

    def words(self) -> tuple[int, ...]:
        return (
            self.max_rows,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            DTYPES[self.dtype],
            self.max_frees,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, d: dict) -> ShmLayout:
        return cls(**{**d, "dtype": getattr(torch, d["dtype"])})

    @property
    def meta_items(self) -> int:
        return 2 * self.max_rows + self.max_frees

    @property
    def qkv_numel(self) -> int:
        return self.max_rows * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def out_numel(self) -> int:
        return self.max_rows * self.num_heads * self.head_dim

    @property
    def data_offset(self) -> int:
        return CONTROL_BYTES + _align(8 * self.meta_items)

    @property
    def slot_bytes(self) -> tuple[int, int]:
        """Bytes of one slot's q|k|v rows and of its output rows."""
        return _align(self.qkv_numel * self.dtype.itemsize), _align(self.out_numel * self.dtype.itemsize)

    @property
    def size(self) -> int:
        return self.data_offset + SLOTS * sum(self.slot_bytes)

    def slot_views(self, data: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per slot, q|k|v [max_rows, H + 2 Hkv, D] and output [max_rows, H, D] views on ``data``
        (uint8 bytes from ``data_offset`` on: host shared memory, or a CUDA IPC buffer)."""
        (qb, ob), rows, d = self.slot_bytes, self.max_rows, self.head_dim
        qkv, out = [], []
        for s in range(SLOTS):
            off = s * (qb + ob)
            qkv.append(data[off : off + qb].view(self.dtype)[: self.qkv_numel].view(rows, -1, d))
            out.append(data[off + qb : off + qb + ob].view(self.dtype)[: self.out_numel].view(rows, -1, d))
        return qkv, out


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def write_header(words: memoryview, layout: ShmLayout) -> None:
    words[W_VERSION] = PROTOCOL_VERSION
    for i, w in enumerate(layout.words()):
        words[W_LAYOUT + i] = w
    words[W_CREATOR_PID] = os.getpid()
    words[W_MAGIC] = MAGIC  # last: a reader seeing it sees the rest


def check_header(words: memoryview, layout: ShmLayout) -> None:
    if words[W_MAGIC] != MAGIC:
        raise ShmLayoutError("not an adrenaline exchange segment")
    if words[W_VERSION] != PROTOCOL_VERSION:
        raise ShmLayoutError(f"protocol version {words[W_VERSION]}, this side speaks {PROTOCOL_VERSION}")
    got = tuple(words[W_LAYOUT : W_LAYOUT + 6])
    if got != layout.words():
        raise ShmLayoutError(f"segment layout {got} differs from the offered {layout.words()}")


# ---- names --------------------------------------------------------------------------------------
_pending: set[str] = set()  # created here, not yet attached: unlinked at exit


def create_segment(size: int) -> tuple[str, mmap.mmap]:
    reap_stale()
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _pending.add(name)
    try:
        os.ftruncate(fd, size)
        return name, mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def open_segment(name: str, size: int) -> mmap.mmap:
    if not NAME.fullmatch(name):
        raise ShmLayoutError(f"{name!r} is not an exchange segment name")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except FileNotFoundError as e:
        raise TransportError(f"segment {name} is gone (its creator closed or died, or another host)") from e
    try:
        if os.fstat(fd).st_size != size:
            raise ShmLayoutError(f"segment {name} has {os.fstat(fd).st_size} bytes, the layout {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    _pending.discard(name)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_stale() -> list[str]:
    """Unlink segments whose creator died before a peer attached; their names."""
    reaped = []
    for name in os.listdir(SHM_DIR):
        m = NAME.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            unlink(name)
            reaped.append(name)
    return reaped


atexit.register(lambda: [unlink(n) for n in list(_pending)])
