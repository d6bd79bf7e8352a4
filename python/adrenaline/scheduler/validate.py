"""Per-request checks that must pass before a request reaches a forward pass or the sampler.

SGLang's front end already types and range-checks most fields, but not all (``top_logprobs_num``
above the vocabulary crashed ``torch.topk``), and the offline ``Engine`` has no front end at all.
Each failure is a ``ValueError`` whose message the client gets with HTTP 400.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adrenaline.core.request import Req

INT_PARAMS = ("max_new_tokens", "min_new_tokens", "top_k")
FLOAT_PARAMS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_in(name: str, x: Any, lo: int, hi: int | None = None) -> None:
    if not _is_int(x) or x < lo or (hi is not None and x > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {x!r}")


def check_request(req: Req, vocab_size: int) -> None:
    """Types and ranges of every per-request field (``verify`` adds the cross-field rules)."""
    p = req.params
    for name in INT_PARAMS:
        if not _is_int(getattr(p, name)):
            raise ValueError(f"{name} must be an integer, got {getattr(p, name)!r}")
    for name in FLOAT_PARAMS:
        x = getattr(p, name)
        if not (_is_int(x) or isinstance(x, float)) or not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
    if p.sampling_seed is not None:
        _int_in("sampling_seed", p.sampling_seed, *SEED_RANGE)
    if not all(isinstance(s, str) for s in p.stop):
        raise ValueError("stop must be a string or a list of strings")
    if not all(_is_int(t) for t in p.stop_token_ids):
        raise ValueError("stop_token_ids must be a list of integers")
    for name in ("regex", "json_schema", "ebnf"):
        if getattr(p, name) is not None and not isinstance(getattr(p, name), str):
            raise ValueError(f"{name} must be a string")
    # OpenAI's logprobs / top_logprobs arrive as top_logprobs_num.
    _int_in("top_logprobs_num (logprobs / top_logprobs)", req.top_logprobs_num, 0, vocab_size)
    _int_in("logprob_start_len (-1: no prompt logprobs)", req.logprob_start_len, -1)
