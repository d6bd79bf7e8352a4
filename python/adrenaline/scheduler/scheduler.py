"""Continuous batching over a ``ModelRunner``: the loop the offline Engine and the server share.

Each ``step`` forms one mixed batch: every running request's next tokens (one for a decode, a
chunk for an unfinished prefill), then waiting requests admitted under the token budget
(``chunked_prefill_size``), the running cap and the KV headroom running requests keep for their
future tokens (``headroom.py``). Prompt prefixes already in the KV cache are reused.
When the pool cannot hold a running request's next token, the most recently admitted request is
retracted (its pages freed, its tokens recomputed later): nothing fails for lack of KV.

Where each request's KV and attention live is the ``Placement``'s answer (``placement.py``); a
PD role plugs in through ``SchedulerHooks`` (``hooks.py``): one admission serves both.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch

from adrenaline.attention.base import RemoteAttentionError
from adrenaline.config import EngineConfig
from adrenaline.core.batch import ForwardBatch, ScheduledReq
from adrenaline.core.request import Req, finish_abort, finish_length
from adrenaline.kv_cache.allocator import PageAllocator, num_pages, page_hashes
from adrenaline.runner.model_runner import ModelRunner
from adrenaline.sampling.grammar import GrammarCompiler
from adrenaline.sampling.sampler import Sampler
from adrenaline.scheduler.faults import fail_batch
from adrenaline.scheduler.finish import FinishChecker
from adrenaline.scheduler.headroom import Headroom
from adrenaline.scheduler.hooks import SchedulerHooks
from adrenaline.scheduler.intake import Intake
from adrenaline.scheduler.outputs import Outputs, SchedulerStats
from adrenaline.scheduler.placement import LocalLoad, Placement

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self, runner: ModelRunner, config: EngineConfig, tokenizer, placement: Placement | None = None
    ) -> None:
        self.runner = runner
        self.config = config
        self.page_size = runner.page_size
        mc = runner.model_config
        self.context_len = mc.context_len
        # Prompt + output end at the KV pool's size too, so one request alone always fits in it.
        self.max_seq_len = min(self.context_len, runner.max_total_tokens)
        self.allocator = PageAllocator(runner.pool.num_pages, self.page_size, config.enable_prefix_caching)
        grammar = (
            GrammarCompiler(tokenizer, mc.vocab_size, mc.eos_token_ids) if tokenizer is not None else None
        )
        self.intake = Intake(mc.vocab_size, self.max_seq_len, grammar, tokenizer is not None, runner.device)
        self.headroom = Headroom(self.page_size, self.max_seq_len)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.arriving: list[Req] = []  # admitted; their prompt KV is on its way from elsewhere
        self.stats = SchedulerStats()
        finish = FinishChecker(tokenizer, mc.eos_token_ids, self.max_seq_len)
        self.outputs = Outputs(Sampler(mc.vocab_size, mc.eos_token_ids, grammar), finish, self.stats)
        self.placement = placement or Placement()
        self.hooks = SchedulerHooks()

    def attach(self, hooks: SchedulerHooks) -> None:
        """Plug in a PD role (once)."""
        if type(self.hooks) is not SchedulerHooks:
            raise RuntimeError("the scheduler already has a PD role attached")
        self.hooks = hooks

    # ---- requests in and out ------------------------------------------------------------------
    def validate(self, req: Req) -> None:
        """Raise ValueError (a client error) for a request that can never be served."""
        self.intake.validate(req)

    def add_request(self, req: Req) -> None:
        self.intake.prepare(req)
        if req.params.max_new_tokens == 0 and not req.wants_prompt_logprobs:
            req.finished_reason = finish_length(0)
            return
        self.waiting.append(req)

    def abort(self, rid: str | None = None, reason: dict[str, Any] | None = None) -> list[Req]:
        """Abort one request (all when rid is None), ending it with ``reason`` (SGLang's format)."""
        reason = reason or finish_abort("aborted by request", 400)
        hit = [r for r in self.requests() if rid is None or r.rid == rid]
        for r in hit:
            r.finished_reason = dict(reason)
            self._release(r)
        self.running = [r for r in self.running if not r.finished]
        self.arriving = [r for r in self.arriving if not r.finished]
        self.waiting = deque(r for r in self.waiting if not r.finished)
        return hit

    def admit_prefilled(
        self, req: Req, token: int, logprob: float | None, top, home: str | None = None
    ) -> None:
        """Start decoding an arriving request whose prompt KV another instance computed (into
        ``req.pages``, or at ``home`` when placed remotely); ``token`` is its first output token,
        sampled there."""
        self.arriving.remove(req)
        self.placement.attach(req, home)
        req.num_computed = len(req.input_ids)
        self.outputs.append_token(req, token, logprob, top)
        if req.finished:
            self._release(req)
        else:
            self.running.append(req)

    def requeue_local(self, req: Req) -> None:
        """An arriving request's remote side refused it: back to the queue's head, to run here."""
        self.arriving.remove(req)
        self._release(req)
        self.placement.keep_local(req)
        self.waiting.appendleft(req)

    def requests(self) -> list[Req]:
        return [*self.running, *self.arriving, *self.waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.arriving or self.waiting)

    # ---- KV pages -------------------------------------------------------------------------------
    def hold_pages(self, pages: list[int]) -> None:
        """Keep ``pages`` past their request's end (PD prefill: until they are sent)."""
        self.allocator.retain(pages)

    def drop_pages(self, pages: list[int]) -> None:
        self.allocator.free(pages)

    def _reserve(self, req: Req, tokens: int) -> bool:
        if not self.placement.is_local(req):  # the remote side grows its pages itself
            return True
        need = num_pages(tokens, self.page_size) - len(req.pages)
        if need <= 0:
            return True
        if need > self.allocator.num_available:
            return False
        req.pages.extend(self.allocator.alloc(need))
        return True

    def has_room(self, req: Req, held: int | None = None, extra: int = 0) -> bool:
        """Whether ``req`` (holding ``held`` pages) fits next to the running requests with their
        headroom and ``extra`` pages promised elsewhere."""
        local = [r for r in [*self.running, *self.arriving] if self.placement.is_local(r)]
        need = self.headroom.pages(req, held) + self.headroom.reserved(local) + extra
        return need <= self.allocator.num_available

    def _release(self, req: Req) -> None:
        """Free a request's pages, publishing its fully computed pages for prefix reuse."""
        self.placement.release(req)
        full = req.num_computed // self.page_size
        if full:
            self.allocator.publish(req.pages[:full], page_hashes(req.fill_ids, self.page_size, full))
        self.allocator.free(req.pages)
        req.pages = []
        req.num_computed = 0

    def _match_prefix(self, req: Req) -> None:
        limit = req.seq_len - 1  # the last token is always computed: its logits are sampled
        if req.wants_prompt_logprobs:
            limit = min(limit, max(req.logprob_start_len - 1 + len(req.input_logprobs), 0))
        pages = self.allocator.match_prefix(
            page_hashes(req.fill_ids, self.page_size, limit // self.page_size)
        )
        req.pages = pages
        req.num_computed = req.cached_tokens = len(pages) * self.page_size

    def _retract(self, victim: Req) -> None:
        self._release(victim)
        victim.retractions += 1
        self.stats.retractions += 1
        self.headroom.retracted()
        self.running.remove(victim)
        self.waiting.appendleft(victim)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledReq]:
        items: list[ScheduledReq] = []
        budget = self.config.chunked_prefill_size
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.seq_len - req.num_computed, budget)
            while not self._reserve(req, req.num_computed + n):
                # the newest request holding pages here (``req`` itself, at worst): one placed
                # elsewhere frees none, and would be recomputed in this very pool
                victim = next(r for r in reversed(self.running) if self.placement.is_local(r))
                self._retract(victim)
                if victim is req:
                    break
            if req in self.running:
                items.append(self._item(req, n))
                budget -= n
                i += 1
        cap = self.config.max_running_requests
        while self.waiting and budget > 0 and len(self.running) + len(self.arriving) < cap:
            req = self.waiting[0]
            if self.hooks.prefilled_elsewhere(req):
                if not self._admit_arriving(req):
                    break
                continue
            self._match_prefix(req)
            n = min(req.seq_len - req.num_computed, budget)
            if ((self.running or items) and not self.has_room(req)) or not self._reserve(
                req, req.num_computed + n
            ):
                # Waiting requests hold no pages (they may be all a running one lacks); pages
                # come back as running requests (or PD transfers) finish.
                self._release(req)
                break
            self.waiting.popleft()
            self.running.append(req)
            items.append(self._item(req, n))
            self.stats.prompt_tokens_cached += req.cached_tokens
            budget -= n
        return items

    def _admit_arriving(self, req: Req) -> bool:
        """Admit a request whose prompt KV another instance computes: place it (telling the placement
        whether it fits here now), reserve its pages (none when placed remotely), let the PD role ask
        for the KV. It runs once that arrives."""
        n, free = len(self.running) + len(self.arriving), self.allocator.num_available
        need = num_pages(len(req.input_ids), self.page_size)
        # the prompt's pages now, and running requests keep room to grow
        fits = need <= free and (n == 0 or self.has_room(req, held=0))
        context = sum(r.seq_len for r in self.running if self.placement.is_local(r))
        if not self.placement.place(req, LocalLoad(n, free, self.page_size, context, fits)):
            if not fits:
                return False
            req.pages = self.allocator.alloc(need)
        self.waiting.popleft()
        self.arriving.append(req)
        self.hooks.on_admitted(req)
        return True

    def _item(self, req: Req, n: int) -> ScheduledReq:
        start = req.num_computed
        end = start + n
        reaches_end = end == req.seq_len
        sample = reaches_end and len(req.output_ids) < req.params.max_new_tokens
        return ScheduledReq(req, start, n, req.prompt_logprob_rows(start, end), sample)

    def step(self) -> list[Req]:
        """Run one forward pass; return the requests that got a new token or finished."""
        items = self.schedule()
        if not items:
            return []
        local = [it for it in items if self.placement.is_local(it.req)]
        remote = [it for it in items if not self.placement.is_local(it.req)]
        items = local + remote  # the local group first: each group is a contiguous token range
        reqs = [it.req for it in remote]
        batch = ForwardBatch.build(items, self.page_size, self.runner.device, len(local) if remote else None)
        try:
            logits = self.runner.forward(batch, self.placement.remote(reqs) if remote else None)
        except RemoteAttentionError as e:  # recompute the remote group here
            self.placement.failed(reqs, e)
            for req in reqs:
                self._retract(req)
            return []
        except Exception as e:  # a failed pass cannot be pinned on one request: fail its batch
            failed = [it.req for it in items]
            fail_batch(failed, e)
            return self._retire(failed)
        self.stats.forward_passes += 1
        self.headroom.step()
        self.stats.batched_requests += len(items)
        self.hooks.on_forward(items)
        return self.process(items, logits)

    def process(self, items: list[ScheduledReq], logits: torch.Tensor) -> list[Req]:
        """Record prompt logprobs, sample, check finish, free finished requests."""
        progressed = self.outputs.process(items, logits)
        return self._retire(progressed)

    def _retire(self, progressed: list[Req]) -> list[Req]:
        """Free the finished requests among ``progressed``; return ``progressed``."""
        for req in progressed:
            if req.finished:
                self._release(req)
        self.running = [r for r in self.running if not r.finished]
        return progressed
