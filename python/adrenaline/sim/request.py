"""A simulated request: lengths, where its KV lives, and the times the metrics need.

It carries the fields ``adrenaline.scheduler.headroom.Headroom`` reads from a runtime ``Req``
(``offload``, ``params.max_new_tokens``, ``output_ids``, ``seq_len``, ``pages``), so the
simulator applies the runtime's own admission headroom rather than a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from adrenaline.sim.workload import Spec


@dataclass
class _Params:
    max_new_tokens: int


class SimReq:
    __slots__ = (
        "rid", "spec", "params", "generated", "held", "num_computed", "offload", "may_offload",
        "prefill", "decode", "arrival", "prefilled", "first_token", "finished",
        "decode_admitted", "seq_len", "output_len",
    )  # fmt: skip

    def __init__(self, rid: int, spec: Spec, arrival: float, max_seq_len: int) -> None:
        self.rid, self.spec, self.arrival = rid, spec, arrival
        self.params = _Params(spec.max_new_tokens)
        self.generated = 0  # output tokens so far
        self.seq_len = spec.input_len  # prompt + output tokens (a field: read per row per step)
        self.output_len = min(spec.output_len, max_seq_len - spec.input_len)  # ends at the limit
        self.held = 0  # KV pages held on the decode instance
        self.num_computed = 0  # tokens whose KV is in the decode instance's pool (or executor's)
        self.offload: int | None = None  # index of the prefill instance whose executor holds the KV
        self.may_offload = True
        self.prefill = self.decode = -1  # instance indices chosen by the router
        self.prefilled = self.first_token = self.finished = None
        self.decode_admitted = None

    # ---- what Headroom reads ------------------------------------------------------------------
    @property
    def output_ids(self) -> range:
        return range(self.generated)

    @property
    def pages(self) -> range:
        return range(self.held)

    def add_token(self) -> bool:
        """One more output token; True when it was the last."""
        self.generated += 1
        self.seq_len += 1
        return self.generated >= self.output_len
