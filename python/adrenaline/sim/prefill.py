"""A simulated prefill instance and its colocated attention executor.

Prefill: FIFO admission while the prompt's pages fit, continuous batching of chunks under the
token budget (``chunked_prefill_size``). A finished prompt keeps its pages until its KV has left
(the decode side may admit it much later): a full pool stalls prefill, as in the runtime.
Executor: a KV pool of its own on the same GPU, holding offloaded requests' KV for their life;
its attention runs at an SM share, which the prefill's compute loses while it has work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from adrenaline.sim.instance import Env, Instance, PagePool, pages_for
from adrenaline.sim.request import SimReq


class Executor(PagePool):
    def __init__(self, pool_tokens: int, page_size: int, share: float) -> None:
        super().__init__(pool_tokens, page_size)
        self.share = share
        self.held: dict[int, int] = {}  # rid -> pages
        self.reqs: dict[int, SimReq] = {}
        self.committed = 0  # future KV (prompt + max_new_tokens) of the requests held
        self.clients: dict[int, int] = {}  # decode instance -> offloaded requests it has here
        self.bytes_read = 0.0  # KV its attention read (bandwidth accounting)
        self.busy_time = 0.0  # attention time it ran, all clients
        self._seen = (0.0, 0.0)  # (time, busy_time) when the prefill last asked its duty cycle

    def duty(self, now: float) -> float:
        """Busy share of its time since the last call (what it took from a co-running prefill)."""
        t0, b0 = self._seen
        self._seen = (now, self.busy_time)
        return min(1.0, (self.busy_time - b0) / (now - t0)) if now > t0 else 0.0

    def grow(self, req: SimReq, tokens: int) -> bool:
        """Hold pages for ``tokens`` of ``req``'s KV; False (nothing taken) when the pool is full."""
        have = self.held.get(req.rid, 0)
        need = pages_for(tokens, self.page_size) - have
        if need > self.free:
            return False
        if req.rid not in self.held:
            self.clients[req.decode] = self.clients.get(req.decode, 0) + 1
            self.reqs[req.rid] = req
            self.committed += req.spec.input_len + req.spec.max_new_tokens
        self.held[req.rid] = have + max(need, 0)
        self.free -= max(need, 0)
        return True

    def release(self, req: SimReq) -> None:
        if req.rid in self.held:
            self.free += self.held.pop(req.rid)
            del self.reqs[req.rid]
            self.committed -= req.spec.input_len + req.spec.max_new_tokens
            self.clients[req.decode] -= 1
            if not self.clients[req.decode]:
                del self.clients[req.decode]


class PrefillInstance(Instance):
    def __init__(
        self,
        idx: int,
        env: Env,
        pool_tokens: int,
        on_prefilled: Callable[[SimReq], None],
        executor: Executor | None = None,
        reserved: bool = False,
    ) -> None:
        """``reserved``: the executor's SM share is partitioned off for good (green contexts)."""
        super().__init__(idx, env, pool_tokens)
        self.reserved = reserved
        self.on_prefilled, self.executor = on_prefilled, executor
        self.waiting: deque[SimReq] = deque()
        self.partial: list[tuple[SimReq, int]] = []  # admitted prompts and tokens computed so far
        self.held: dict[int, int] = {}
        # what its executor reports to the decode side: recent queue lengths and TTFTs
        self.queue_history: deque[int] = deque(maxlen=8)
        self.ttft_history: deque[float] = deque(maxlen=8)
        self.bytes_moved = 0.0  # weights read + KV written (bandwidth accounting)

    def add(self, req: SimReq) -> None:
        self.waiting.append(req)
        if not self.busy:
            self._step()

    def release(self, req: SimReq) -> None:
        """Its KV has left (to the decode side or into the executor's pool)."""
        self.free += self.held.pop(req.rid)
        if not self.busy:
            self._step()

    def _schedule(self) -> list[tuple[SimReq, int, int]]:
        budget, items = self.chunk_budget, []
        for req, done in self.partial:
            if budget <= 0:
                break
            n = min(req.spec.input_len - done, budget)
            items.append((req, done, n))
            budget -= n
        while self.waiting and budget > 0:
            req = self.waiting[0]
            need = pages_for(req.spec.input_len, self.page_size)
            if need > self.free:
                break
            self.waiting.popleft()
            self.free -= need
            self.held[req.rid] = need
            self.partial.append((req, 0))
            n = min(req.spec.input_len, budget)
            items.append((req, 0, n))
            budget -= n
        return items

    def _step(self) -> None:
        items = self._schedule()
        if not items:
            self.busy = False
            return
        tokens = sum(n for _, _, n in items)
        pairs = sum(n * (done + n / 2) for _, done, n in items)
        dt = self.cost.prefill_time(tokens, pairs, self._executor_share())
        self.busy = True
        self.busy_time += dt
        self.steps += 1
        self.bytes_moved += self.cost.model.weight_bytes + tokens * self.cost.model.kv_bytes_per_token
        self.loop.after(dt, lambda: self._end(items))

    def _executor_share(self) -> float:
        """SMs the executor takes from this step: its whole cap when partitioned (green contexts),
        else (MPS: the cap is a limit, not a reservation) the cap times its recent duty cycle."""
        ex = self.executor
        if ex is None:
            return 0.0
        duty = ex.duty(self.loop.now)
        if not ex.held:
            return 0.0
        return ex.share if self.reserved else ex.share * duty

    def _end(self, items: list[tuple[SimReq, int, int]]) -> None:
        progress = {req.rid: done + n for req, done, n in items}
        still = []
        for req, done in self.partial:
            done = progress.get(req.rid, done)
            if done < req.spec.input_len:
                still.append((req, done))
            else:
                req.prefilled = self.loop.now
                self.on_prefilled(req)
        self.partial = still
        self.queue_history.append(len(self.waiting))
        self._step()
