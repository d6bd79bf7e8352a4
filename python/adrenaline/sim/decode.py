"""A simulated decode instance, following the runtime's rules step for step.

Admission (``disaggregation/decode.py``): FIFO under the running cap, none while a retracted
request waits; a local request needs its prompt's pages now and room next to the headroom
(``Headroom``, imported from the scheduler) of the local requests running or on their way; the
offload policy decides first, told whether that holds; an offloaded request needs room in its
prefill instance's executor, else it is taken locally. Each step
(``scheduler.py``): every running request's next token, pages grown per token, the most recent
request retracted when the pool runs out, retracted requests recomputed here first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from adrenaline.scheduler.headroom import Headroom
from adrenaline.sim.cost import decode_step_time
from adrenaline.sim.instance import Env, Instance, pages_for
from adrenaline.sim.policy import Decider
from adrenaline.sim.prefill import Executor
from adrenaline.sim.request import SimReq


class DecodeInstance(Instance):
    def __init__(
        self,
        idx: int,
        env: Env,
        pool_tokens: int,
        max_running: int,
        decider: Decider,
        executors: Sequence[Executor | None],
        on_admitted: Callable[[SimReq], None],
        on_finished: Callable[[SimReq], None],
    ) -> None:
        super().__init__(idx, env, pool_tokens)
        self.max_running, self.decider = max_running, decider
        self.executors, self.on_admitted, self.on_finished = executors, on_admitted, on_finished
        self.headroom = Headroom(env.page_size, env.max_seq_len)
        self.pending: deque[SimReq] = deque()
        self.inflight: dict[int, SimReq] = {}
        self.running: list[SimReq] = []
        self.waiting: deque[SimReq] = deque()  # retracted, recomputed here
        # the local requests' headroom in pages (``_reserved``): the sum the runtime recomputes per
        # admission, cached until a step, a retraction or an arrival changes it
        self._room: int | None = None
        self.batched = self.retractions = self.fallbacks = 0
        self.exposed_remote = 0.0  # remote attention + exchange beyond the local attention

    # ---- admission ----------------------------------------------------------------------------
    def add(self, req: SimReq) -> None:
        self.pending.append(req)
        self.admit()

    def counts(self) -> tuple[int, int]:
        """(local, offloaded) requests running or on their way here."""
        offloaded = sum(r.offload is not None for r in self.running)
        offloaded += sum(r.offload is not None for r in self.inflight.values())
        return len(self.running) + len(self.inflight) - offloaded, offloaded

    def admit(self) -> None:
        # a retracted request heads the runtime's queue: nothing is admitted past it
        while not self.waiting and self.pending and len(self.running) + len(self.inflight) < self.max_running:
            req = self.pending[0]
            ex = self.executors[req.prefill]
            fits = self._fits(req)
            if req.may_offload and ex is not None and self.decider.choose(self, req, fits):
                if ex.grow(req, req.spec.input_len):
                    req.offload = req.prefill
                else:  # no executor room: the prefill side says so and it is taken locally
                    req.may_offload = False
                    self.decider.released(req, req.prefill)
            if req.offload is None and not fits:
                return
            need = 0 if req.offload is not None else pages_for(req.spec.input_len, self.page_size)
            self.pending.popleft()
            self.free -= need
            req.held = need
            if self._room is not None and req.offload is None:
                self._room += self.headroom.pages(req)
            self.inflight[req.rid] = req
            req.decode_admitted = self.loop.now
            self.on_admitted(req)

    def _fits(self, req: SimReq) -> bool:
        """Whether ``req``, kept local, is admitted now (the runtime's ``_admit_arriving``): its
        prompt's pages are free and, beside other requests, the local ones' headroom too."""
        if pages_for(req.spec.input_len, self.page_size) > self.free:
            return False
        alone = not (self.running or self.inflight)
        return alone or self.headroom.pages(req, 0) + self._reserved() <= self.free

    def _reserved(self) -> int:
        """Headroom of the local requests running or on their way (the runtime's ``has_room``)."""
        if self._room is None:
            local = [r for r in (*self.running, *self.inflight.values()) if r.offload is None]
            self._room = self.headroom.reserved(local)
        return self._room

    def kv_arrived(self, req: SimReq) -> None:
        """The prompt's KV and first token are here: decode it (``admit_prefilled``)."""
        del self.inflight[req.rid]
        self._room = None
        req.num_computed = req.spec.input_len
        req.first_token = self.loop.now
        if req.add_token():
            self._finish(req)
        else:
            self.running.append(req)
            if not self.busy:
                self._step()

    # ---- pages --------------------------------------------------------------------------------
    def _reserve(self, req: SimReq, tokens: int) -> bool:
        if req.offload is not None:
            return self.executors[req.offload].grow(req, tokens)
        need = pages_for(tokens, self.page_size) - req.held
        if need > self.free:
            return False
        if need > 0:
            req.held += need
            self.free -= need
        return True

    def _release(self, req: SimReq) -> None:
        if req.offload is not None:
            self.executors[req.offload].release(req)
            self.decider.released(req, req.offload)
            req.offload = None
        self.free += req.held
        req.held = req.num_computed = 0

    def _retract(self, victim: SimReq) -> None:
        self._release(victim)
        self.retractions += 1
        self.headroom.retracted()
        self.running.remove(victim)
        self.waiting.appendleft(victim)

    # ---- steps --------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[SimReq, int]]:
        items, budget, i, ps = [], self.chunk_budget, 0, self.page_size
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.seq_len - req.num_computed, budget)
            kept = True
            # (fast path: a decode token that lands in a page it holds needs no reservation)
            while (n != 1 or req.num_computed % ps == 0) and not self._reserve(req, req.num_computed + n):
                # the runtime retracts the newest; an executor out of room sends its own back here
                victim = req if req.offload is not None else self.running[-1]
                self.fallbacks += victim is req and req.offload is not None
                self._retract(victim)
                if victim is req:
                    kept = False
                    break
            if kept:
                items.append((req, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            n = min(req.seq_len - req.num_computed, budget)
            crowded = (self.running or items) and not self._has_room(req)
            if crowded or not self._reserve(req, req.num_computed + n):
                self._release(req)
                break
            self.waiting.popleft()
            self.running.append(req)
            self._room = None
            items.append((req, n))
            budget -= n
        return items

    def _has_room(self, req: SimReq) -> bool:
        return self.headroom.pages(req) + self._reserved() <= self.free

    def _step(self) -> None:
        self._room = None
        items = self._schedule()
        if not items:
            self.busy = False
            return
        local_rows = local_ctx = ext_tokens = 0
        ext_pairs = 0.0
        remote: dict[int, list[int]] = {}
        for req, n in items:
            if n > 1 or req.num_computed == 0:  # a recomputed prompt (chunk)
                ext_tokens += n
                ext_pairs += n * (req.num_computed + n / 2)
            elif req.offload is None:
                local_rows += 1
                local_ctx += req.seq_len
            else:
                g = remote.setdefault(req.offload, [0, 0])
                g[0] += 1
                g[1] += req.seq_len
        groups = []
        for e, (rows, ctx) in remote.items():
            ex = self.executors[e]
            groups.append((rows, ctx, ex.share, len(ex.clients)))
            ex.bytes_read += ctx * self.cost.model.kv_bytes_per_token
            ex.busy_time += self.cost.executor_time(rows, ctx, ex.share)
        dt, local, far = decode_step_time(self.cost, local_rows, local_ctx, groups, (ext_tokens, ext_pairs))
        self.busy = True
        self.busy_time += dt
        self.exposed_remote += max(far - local, 0.0)
        self.steps += 1
        self.batched += len(items)
        self.loop.after(dt, lambda: self._end(items))

    def _end(self, items: list[tuple[SimReq, int]]) -> None:
        for req, n in items:
            req.num_computed += n
            if req.num_computed == req.seq_len and req.add_token():
                self._finish(req)
        self.headroom.step()
        self.running = [r for r in self.running if r.finished is None]
        self._room = None
        self.admit()
        self._step()

    def _finish(self, req: SimReq) -> None:
        self._release(req)
        req.finished = self.loop.now
        self.on_finished(req)
