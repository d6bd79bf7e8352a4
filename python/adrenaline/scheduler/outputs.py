"""A step's logits into its requests: prompt logprobs, sampled tokens with their logprobs, finish."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adrenaline.core.batch import ScheduledReq
from adrenaline.core.request import Req, finish_length
from adrenaline.sampling.sampler import Sampler, SampleRow, top_logprobs
from adrenaline.scheduler.faults import guard, sample_isolated
from adrenaline.scheduler.finish import FinishChecker


@dataclass
class SchedulerStats:
    forward_passes: int = 0
    batched_requests: int = 0  # requests summed over forward passes: / forward_passes = mean batch
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    retractions: int = 0


class Outputs:
    def __init__(self, sampler: Sampler, finish: FinishChecker, stats: SchedulerStats) -> None:
        self.sampler = sampler
        self.finish = finish
        self.stats = stats

    def process(self, items: list[ScheduledReq], logits: torch.Tensor) -> list[Req]:
        """Record prompt logprobs, sample, check finish; return the requests that progressed.

        Each request's part runs guarded (``faults.py``): a failure ends that request with a 500
        and the others go on."""
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
            rows = [SampleRow.of(r) for r in sample_reqs]
            for req, out in zip(
                sample_reqs, sample_isolated(self.sampler, logits, sample_rows, sample_reqs, rows)
            ):
                if out is not None:
                    guard(req, self.append_token, req, *out)
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

    def append_token(self, req: Req, token: int, logprob: float | None, top) -> None:
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
