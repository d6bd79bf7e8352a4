"""Messages of the PD KV handshake (one version), between a decode and a prefill instance.

decode -> prefill: ``KVRequest`` (the pages to fill, or offload; carries the version, the KV
layout and, over Mooncake, where the decode pool is registered), ``KVAck`` once the KV is in,
``KVAlive`` while queued for room. prefill -> decode:
``KVPages`` (with the packed pages), ``KVDone`` (the first token), ``KVAlive`` while prefilling.
Either way: ``KVCancel``.
"""

from __future__ import annotations

from msgspec import Struct

from adrenaline.offload.protocol import LoadReport
from adrenaline.transport.mooncake_kv import KVPlaneDescriptor
from adrenaline.transport.protocol import Protocol

PD_VERSION = 1


class KVLayout(Struct, frozen=True):
    """What must agree between the two pools for pages to be copied as they are."""

    num_layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str


class KVRequest(Struct):
    version: int
    room: int
    rid: str
    pages: list[int]
    layout: KVLayout
    offload: bool = False  # keep the KV in the prefill side's attention executor
    future_tokens: int = 0  # prompt + max_new_tokens: what an offload commits on the executor
    target: KVPlaneDescriptor | None = None  # one-sided data plane: write the pages straight in


class KVPages(Struct):  # + one tensor: [layers, 2, n, page, kv_heads, head_dim]
    room: int
    first: int  # index of the first page in the decode side's list


class KVDone(Struct):
    room: int
    token: int
    logprob: float | None = None
    top: list[tuple[float, int]] | None = None
    executor: str | None = None  # the attention executor holding an offloaded request's KV
    load: LoadReport | None = None  # the prefill instance's load and its executor's, for the policy


class KVAck(Struct):
    room: int


class KVAlive(Struct):
    room: int


class KVCancel(Struct):
    room: int
    message: str
    retry_local: bool = False  # offloading refused: the decode side may take the KV itself


PD = Protocol("PD", PD_VERSION, [KVRequest, KVPages, KVDone, KVAck, KVAlive, KVCancel])
