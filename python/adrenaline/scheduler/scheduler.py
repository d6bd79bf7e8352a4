"""Continuous batching over a ``ModelRunner``: the loop the offline Engine and the server share.

Each ``step`` forms one mixed batch: every running request's next tokens (one for a decode, a
chunk for an unfinished prefill), then waiting requests admitted under the token budget
(``chunked_prefill_size``), the running cap and the KV headroom running requests keep for their
future tokens (``headroom.py``). Prompt prefixes already in the KV cache are reused.
When the pool cannot hold a running request's next token, the most recently admitted request is
retracted (its pages freed, its tokens recomputed later): nothing fails for lack of KV.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adrenaline.config import EngineConfig
from adrenaline.kv_cache.allocator import PageAllocator, page_hashes
from adrenaline.runner.model_runner import ModelRunner
from adrenaline.sampling.grammar import GrammarCompiler
from adrenaline.sampling.sampler import Sampler, top_logprobs
from adrenaline.scheduler.batch import ForwardBatch, ScheduledReq
from adrenaline.scheduler.faults import fail_batch, guard, sample_isolated
from adrenaline.scheduler.finish import FinishChecker
from adrenaline.scheduler.headroom import Headroom
from adrenaline.scheduler.request import Req, finish_abort, finish_length
from adrenaline.scheduler.validate import check_request
from adrenaline.transport.base import TransportError

if TYPE_CHECKING:
    from adrenaline.offload.client import OffloadClient

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    forward_passes: int = 0
    batched_requests: int = 0  # requests summed over forward passes: / forward_passes = mean batch
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    retractions: int = 0
    offload_fallbacks: int = 0  # offloaded requests recomputed here after their executor failed


class Scheduler:
    def __init__(self, runner: ModelRunner, config: EngineConfig, tokenizer) -> None:
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
        self.grammar = grammar
        self.sampler = Sampler(mc.vocab_size, mc.eos_token_ids, grammar)
        self.finish = FinishChecker(tokenizer, mc.eos_token_ids, self.max_seq_len)
        self.headroom = Headroom(self.page_size, self.max_seq_len)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.stats = SchedulerStats()
        # Computes the attention of offloaded requests (``Req.offload``) on attention executors.
        self.remote: OffloadClient | None = None
        # Called after each forward with its items: their KV for [start, end) is in the pool.
        self.on_forward: Callable[[list[ScheduledReq]], None] | None = None

    # ---- requests in and out ------------------------------------------------------------------
    def validate(self, req: Req) -> None:
        """Raise ValueError (a client error) for a request that can never be served."""
        check_request(req, self.runner.model_config.vocab_size)
        n = len(req.input_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; this server accepts at most {self.max_seq_len - 1}")
        vocab = self.runner.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.input_ids):
            raise ValueError(f"input_ids must be in [0, {vocab})")
        req.params.verify(vocab)
        if self.grammar is None and (req.params.regex or req.params.json_schema or req.params.ebnf):
            raise ValueError("structured output needs a tokenizer; this server runs with skip_tokenizer_init")
        if self.finish.tokenizer is None and req.params.stop:
            raise ValueError("stop strings need a tokenizer; this server runs with skip_tokenizer_init")
        if req.logprob_start_len > n:  # == n: no prompt logprobs, as in SGLang
            raise ValueError(
                f"logprob_start_len ({req.logprob_start_len}) must be at most the prompt length ({n})"
            )

    def prepare(self, req: Req) -> None:
        """Validate and set up sampling state, without queueing (PD decode queues it itself)."""
        self.validate(req)
        if self.grammar is not None:
            req.grammar = self.grammar.compile(req.params)
        if req.params.sampling_seed is not None:
            req.generator = torch.Generator(device=self.runner.device).manual_seed(req.params.sampling_seed)
        if req.wants_prompt_logprobs and req.logprob_start_len == 0:
            req.input_logprobs.append(None)  # the first token has no score
            req.input_top_logprobs.append(None)

    def add_request(self, req: Req) -> None:
        self.prepare(req)
        if req.params.max_new_tokens == 0 and not req.wants_prompt_logprobs:
            req.finished_reason = finish_length(0)
            return
        self.waiting.append(req)

    def abort(self, rid: str | None = None, reason: dict[str, Any] | None = None) -> list[Req]:
        """Abort one request (all when rid is None), ending it with ``reason`` (SGLang's format)."""
        reason = reason or finish_abort("aborted by request", 400)
        hit = [r for r in [*self.running, *self.waiting] if rid is None or r.rid == rid]
        for r in hit:
            r.finished_reason = dict(reason)
            self._release(r)
        self.running = [r for r in self.running if not r.finished]
        self.waiting = deque(r for r in self.waiting if not r.finished)
        return hit

    def admit_prefilled(self, req: Req, token: int, logprob: float | None, top) -> None:
        """Start decoding a prepared request whose prompt KV another instance computed into
        ``req.pages``; ``token`` is its first output token, sampled there."""
        req.num_computed = len(req.input_ids)
        self._append_token(req, token, logprob, top)
        if req.finished:
            self._release(req)
        else:
            self.running.append(req)

    def requests(self) -> list[Req]:
        return [*self.running, *self.waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- KV pages -------------------------------------------------------------------------------
    def _reserve(self, req: Req, tokens: int) -> bool:
        if req.offload is not None:  # the executor grows its pages itself
            return True
        need = -(-tokens // self.page_size) - len(req.pages)
        if need <= 0:
            return True
        if need > self.allocator.num_available:
            return False
        req.pages.extend(self.allocator.alloc(need))
        return True

    def has_room(self, req: Req, held: int | None = None, extra: int = 0) -> bool:
        """Whether ``req`` (holding ``held`` pages) fits next to the running requests with their
        headroom and ``extra`` pages promised elsewhere."""
        need = self.headroom.pages(req, held) + self.headroom.reserved(self.running) + extra
        return need <= self.allocator.num_available

    def _release(self, req: Req) -> None:
        """Free a request's pages, publishing its fully computed pages for prefix reuse."""
        if req.offload is not None:
            self.remote.free(req)
            req.offload = None
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
                victim = self.running[-1]
                self._retract(victim)
                if victim is req:
                    break
            if req in self.running:
                items.append(self._item(req, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
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
        items.sort(key=lambda it: it.req.offload is not None)  # the local group first
        offloaded = [it.req for it in items if it.req.offload is not None]
        batch = ForwardBatch.build(items, self.page_size, self.runner.device)
        if offloaded:
            batch.num_local = len(items) - len(offloaded)
            self.remote.prepare(offloaded)
        try:
            logits = self.runner.forward(batch, self.remote if offloaded else None)
        except TransportError as e:  # an executor died or stalled: recompute its requests here
            logger.warning(
                "attention executor failed (%s): %d requests recomputed locally", e, len(offloaded)
            )
            for req in offloaded:
                self._retract(req)
                self.stats.offload_fallbacks += 1
            return []
        except Exception as e:  # a failed pass cannot be pinned on one request: fail its batch
            failed = [it.req for it in items]
            fail_batch(failed, e)
            return self._retire(failed)
        self.stats.forward_passes += 1
        self.headroom.step()
        self.stats.batched_requests += len(items)
        if self.on_forward is not None:
            self.on_forward(items)
        return self.process(items, logits)

    def process(self, items: list[ScheduledReq], logits: torch.Tensor) -> list[Req]:
        """Record prompt logprobs, sample, check finish, free finished requests."""
        row = 0
        sample_rows, sample_reqs = [], []
        progressed: list[Req] = []
        for it in items:
            req = it.req
            req.num_computed = it.end
            if it.start < len(req.input_ids):
                self.stats.prompt_tokens_computed += min(it.end, len(req.input_ids)) - it.start
            if it.prompt_rows:
                if not guard(req, self._record_prompt_logprobs, req, logits[row : row + len(it.prompt_rows)]):
                    progressed.append(req)
                row += len(it.prompt_rows)
            if it.sample:
                if not req.finished:
                    sample_rows.append(row)
                    sample_reqs.append(req)
                row += 1
        if sample_reqs:
            rows = [r.sample_row(len(r.output_ids) < r.params.min_new_tokens) for r in sample_reqs]
            for req, out in zip(
                sample_reqs, sample_isolated(self.sampler, logits, sample_rows, sample_reqs, rows)
            ):
                if out is not None:
                    guard(req, self._append_token, req, *out)
                progressed.append(req)
        for it in items:  # a prefill of max_new_tokens=0 ends without sampling
            req = it.req
            if (
                not it.sample
                and not req.finished
                and it.end == req.seq_len
                and req.params.max_new_tokens == 0
            ):
                req.finished_reason = finish_length(0)
                progressed.append(req)
        return self._retire(progressed)

    def _retire(self, progressed: list[Req]) -> list[Req]:
        """Free the finished requests among ``progressed``; return ``progressed``."""
        for req in progressed:
            if req.finished:
                self._release(req)
        self.running = [r for r in self.running if not r.finished]
        return progressed

    def _record_prompt_logprobs(self, req: Req, logits: torch.Tensor) -> None:
        lp = torch.log_softmax(logits, dim=-1)
        first = req.logprob_start_len - 1 + len(req.input_logprobs)  # position scoring the next token
        targets = torch.tensor(req.input_ids[first + 1 : first + 1 + lp.shape[0]], device=lp.device)
        req.input_logprobs.extend(lp.gather(1, targets[:, None])[:, 0].tolist())
        if req.top_logprobs_num:
            req.input_top_logprobs.extend(top_logprobs(lp, req.top_logprobs_num))
        else:
            req.input_top_logprobs.extend([None] * lp.shape[0])

    def _append_token(self, req: Req, token: int, logprob: float | None, top) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        if req.return_logprob:
            req.output_logprobs.append(logprob)
            req.output_top_logprobs.append(top)
        if req.grammar is not None:
            req.grammar.accept(token)
        req.finished_reason = self.finish.check(req)
