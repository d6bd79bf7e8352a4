"""A request's life inside the scheduler: tokens, KV pages, sampling state, logprobs, finish."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from adrenaline.core.sampling_params import SamplingParams

if TYPE_CHECKING:  # annotation only: grammars are compiled above, by the scheduler
    from adrenaline.sampling.grammar import Grammar


def finish_stop(matched: int | str) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def finish_length(n: int) -> dict[str, Any]:
    return {"type": "length", "length": n}


def finish_abort(message: str, status_code: int = 500) -> dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": status_code}


class Bootstrap(NamedTuple):
    """SGLang's PD routing fields, as the front end received them (None: not set)."""

    host: str | None = None
    port: int | None = None
    room: int | None = None


@dataclass(eq=False)  # a request is itself: ``req in running`` compares identities, not every field
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # first prompt position to return logprobs for; -1: none
    top_logprobs_num: int = 0
    stream: bool = False
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    extra: dict[str, Any] = field(default_factory=dict)  # front-end fields carried through

    # ---- state owned by the scheduler ----
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of fill_ids whose KV is in the pool
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (last admission)
    generator: torch.Generator | None = None
    grammar: Grammar | None = None
    finished_reason: dict[str, Any] | None = None
    retractions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # logprobs, filled as computed
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.input_ids)

    def prompt_logprob_rows(self, start: int, end: int) -> list[int]:
        """Positions in [start, end) whose logits score a prompt token at or after logprob_start_len.

        Position p scores token p + 1; token 0 has no score (SGLang reports None for it).
        """
        if not self.wants_prompt_logprobs:
            return []
        lo = max(start, self.logprob_start_len - 1 + len(self.input_logprobs), 0)  # skip recorded ones
        hi = min(end, len(self.input_ids) - 1)
        return list(range(lo, hi))
