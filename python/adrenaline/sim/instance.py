"""What every simulated instance has: a KV page pool, and its place in the cluster."""

from __future__ import annotations

from dataclasses import dataclass

from adrenaline.sim.cost import CostModel
from adrenaline.sim.engine import EventLoop


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class PagePool:
    """Free-page accounting of a KV pool (the pages themselves are not simulated)."""

    def __init__(self, tokens: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = self.free = tokens // page_size

    @property
    def used_tokens(self) -> int:
        return (self.num_pages - self.free) * self.page_size


@dataclass
class Env:
    """What all instances of a cluster share."""

    loop: EventLoop
    cost: CostModel
    page_size: int
    chunk_budget: int  # tokens per forward pass (chunked_prefill_size)
    max_seq_len: int  # prompt + output end here (the runtime: min(context length, KV pool))


class Instance(PagePool):
    def __init__(self, idx: int, env: Env, pool_tokens: int) -> None:
        super().__init__(pool_tokens, env.page_size)
        self.idx, self.loop, self.cost, self.chunk_budget = idx, env.loop, env.cost, env.chunk_budget
        self.busy = False
        self.busy_time = 0.0
        self.steps = 0
