"""KV headroom kept for running requests' future tokens when admitting new ones.

Admitting whatever fits the prompt fills the pool with requests that then outgrow it together and
retract one another over and over (each retraction recomputes a whole request). Like SGLang's
``new_token_ratio``, a share of each running request's remaining ``max_new_tokens`` is kept free:
the share starts at 0.7, decays to 0.1 while requests finish without trouble (most stop well
before their limit) and rises again at each retraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rule is pure: the capacity planner (adrenaline.sim) imports it without torch
    from adrenaline.core.request import Req

INIT_RATIO, MIN_RATIO, DECAY_PER_STEP, RETRACT_BUMP = 0.7, 0.1, 0.001, 0.1


@dataclass
class Headroom:
    page_size: int
    max_seq_len: int
    ratio: float = INIT_RATIO

    def pages(self, req: Req, held: int | None = None) -> int:
        """Pages ``req`` is expected to need beyond the ``held`` it has (default: ``req.pages``)."""
        future = min(req.params.max_new_tokens - len(req.output_ids), self.max_seq_len - req.seq_len)
        tokens = req.seq_len + math.ceil(max(future, 0) * self.ratio)
        held = len(req.pages) if held is None else held
        return max(-(-tokens // self.page_size) - held, 0)

    def reserved(self, reqs: Iterable[Req]) -> int:
        return sum(self.pages(r) for r in reqs)

    def step(self) -> None:
        self.ratio = max(MIN_RATIO, self.ratio - DECAY_PER_STEP)

    def retracted(self) -> None:
        self.ratio = min(1.0, self.ratio + RETRACT_BUMP)
