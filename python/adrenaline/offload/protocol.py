"""Messages between decode instances, prefill schedulers and attention executors (one version).

Per decode step, a decode instance sends each executor of its offloaded group one ``AttnStep``
(rooms, lengths, rooms freed since), then per layer one ``AttnQKV`` with the packed q|k|v; the
executor answers each layer with ``AttnOut`` (the output, plus its KV usage) or ``AttnError``. On
one host, a ``ShmOffer`` answered by ``ShmOfferReply`` moves that per-step and per-layer traffic
onto a shared-memory channel (``transport/shm_exchange.py``); between hosts, a ``MooncakeOffer``
answered by ``MooncakeOfferReply`` moves it onto the Mooncake Transfer Engine
(``transport/mooncake_offload.py``); control stays here. The
prefill scheduler beside an executor reserves pages for an offloaded prompt (``ExecAlloc``, which
carries the version), frees them and reads the executor's statistics, never waiting for a reply.
"""

from __future__ import annotations

from msgspec import Struct

from adrenaline.transport.mooncake_offload import OffloadEndpoint
from adrenaline.transport.protocol import Protocol

OFFLOAD_VERSION = 1


class ExecutorStats(Struct):
    requests: int  # rooms holding KV
    used_pages: int
    num_pages: int
    layers_served: int
    decode_peers: list[str]
    capacity_tokens: int = 0  # the ledger's room for future KV (``offload/ledger.py``)
    reserve_tokens: int = 0
    committed: dict[str, int] = {}  # decode instance -> future KV tokens promised to it
    refused: dict[str, int] = {}  # ledger refusals by reason


class LoadReport(Struct):
    """A prefill instance's load, and its executor's as one decode instance shares it: what that
    decode instance prices offloads to this executor with (sent with each ``KVDone``)."""

    prefill_queue: list[int]  # recent waiting-queue lengths, oldest first
    ttft_ms: list[float]  # recent prefill times to first token, oldest first
    capacity_tokens: int = 0  # 0: no executor here, or it is down
    reserve_tokens: int = 0
    committed_tokens: int = 0  # future KV promised to every decode instance
    seen_ours_tokens: int = 0  # ... of it, to the one this report goes to
    clients: int = 1  # decode instances sharing the room, the receiver included
    requests: int = 0  # rooms holding KV there, every decode instance's
    context_tokens: int = 0  # their KV now


# ---- decode instance -> executor ---------------------------------------------------------------
class AttnStep(Struct):
    version: int
    step: int
    rooms: list[int]
    seq_lens: list[int]
    frees: list[int]


class AttnQKV(Struct):  # + one tensor: [rows, H + 2 Hkv, D]
    step: int
    layer: int


class AttnFree(Struct):
    rooms: list[int]


class ShmOffer(Struct):  # same-host fast path: attach to this shared-memory channel
    version: int
    offer: dict


class MooncakeOffer(Struct):  # between hosts: write q|k|v one-sided, here is where outputs go
    version: int
    endpoint: OffloadEndpoint


# ---- executor -> decode instance ---------------------------------------------------------------
class MooncakeOfferReply(Struct):
    endpoint: OffloadEndpoint | None = None  # where q|k|v go; None: refused (``error``)
    error: str | None = None


class ShmOfferReply(Struct):
    error: str | None = None  # None: attached; per-layer data now goes through the channel


class AttnOut(Struct):  # + one tensor: [rows, H, D]
    step: int
    layer: int
    used_pages: int  # the executor's KV usage after this layer
    num_pages: int
    attend_us: int = 0  # the executor's own time computing this layer's attention


class AttnError(Struct):
    step: int
    layer: int
    message: str


# ---- prefill scheduler <-> its executor --------------------------------------------------------
class ExecAlloc(Struct):
    version: int
    ask: int
    room: int
    tokens: int  # the prompt's KV, allocated now
    future_tokens: int = 0  # prompt + max_new_tokens, committed in the ledger (0: ``tokens``)
    client: str = ""  # the decode instance it is offloaded for (its fair share)


class ExecAllocReply(Struct):
    ask: int
    room: int
    stats: ExecutorStats
    pages: list[int] | None = None
    error: str | None = None


class ExecFree(Struct):
    rooms: list[int]


class ExecStatsAsk(Struct):
    ask: int


class ExecStatsReply(Struct):
    ask: int
    stats: ExecutorStats


OFFLOAD = Protocol(
    "attention offload",
    OFFLOAD_VERSION,
    [
        AttnStep,
        AttnQKV,
        AttnFree,
        ShmOffer,
        ShmOfferReply,
        MooncakeOffer,
        MooncakeOfferReply,
        AttnOut,
        AttnError,
        ExecAlloc,
        ExecAllocReply,
        ExecFree,
        ExecStatsAsk,
        ExecStatsReply,
    ],
)
