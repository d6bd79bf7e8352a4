"""Batched sampling: penalties, grammar masks, greedy / temperature / top-k / top-p / min-p, seeds,
and the logprobs a request asked for (computed from the model's raw distribution, like SGLang)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline.core.request import Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.sampling.grammar import Grammar, GrammarCompiler


@dataclass
class SampleRow:
    """What the sampler needs from one request for one step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None
    grammar: Grammar | None = None
    block_eos: bool = False  # min_new_tokens not reached: EOS/stop ids are masked
    top_logprobs_num: int = 0
    want_logprob: bool = False

    @classmethod
    def of(cls, req: Req) -> SampleRow:
        return cls(
            params=req.params,
            prompt_ids=req.input_ids,
            output_ids=req.output_ids,
            generator=req.generator,
            grammar=req.grammar,
            block_eos=len(req.output_ids) < req.params.min_new_tokens,
            top_logprobs_num=req.top_logprobs_num if req.return_logprob else 0,
            want_logprob=req.return_logprob,
        )


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]] | None]


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    """Per row of [N, V] logprobs, its ``k`` best (logprob, token id) pairs, SGLang's format."""
    vals, idx = logprobs.topk(k, dim=-1)
    return [list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())]


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], grammar: GrammarCompiler | None = None):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.grammar = grammar

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleOutput:
        """logits: float32 [B, V] for the rows, in order."""
        raw_logprobs = None
        if any(r.want_logprob or r.top_logprobs_num for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        self._penalise(logits, rows)
        blocked = [i for i, r in enumerate(rows) if r.block_eos]
        for i in blocked:
            stop_ids = set(rows[i].params.stop_token_ids)
            if not rows[i].params.ignore_eos:
                stop_ids.update(self.eos_token_ids)
            logits[i, list(stop_ids)] = float("-inf")
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if constrained and self.grammar is not None:
            self.grammar.apply(logits, [i for i, _ in constrained], [g for _, g in constrained])
        tokens = self._sample(logits, rows)
        logprobs: list[float | None] = [None] * len(rows)
        tops: list[list[tuple[float, int]] | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if r.want_logprob:
                    logprobs[i] = raw_logprobs[i, tokens[i]].item()
                if r.top_logprobs_num:
                    tops[i] = top_logprobs(raw_logprobs[i : i + 1], r.top_logprobs_num)[0]
        return SampleOutput(tokens, logprobs, tops)

    def _penalise(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if not p.has_penalties:
                continue
            if p.repetition_penalty != 1.0:  # HF/SGLang semantics over prompt and output tokens
                seen = torch.tensor(
                    sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=logits.device
                )
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if r.output_ids and (p.frequency_penalty or p.presence_penalty):  # OpenAI semantics, output only
                counts = torch.bincount(
                    torch.tensor(r.output_ids, device=logits.device), minlength=self.vocab_size
                )
                counts = counts[: logits.shape[1]].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return tokens
        sub = logits[sampled]
        dev = sub.device
        temp = torch.tensor([rows[i].params.temperature for i in sampled], device=dev)
        probs = torch.softmax(sub / temp[:, None], dim=-1)
        probs = self._filter(probs, [rows[i].params for i in sampled])
        for j, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator).item())
        return tokens

    @staticmethod
    def _filter(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Top-k, top-p and min-p truncation, renormalised."""
        dev = probs.device
        top_k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[1] for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        min_p = torch.tensor([p.min_p for p in params], device=dev)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[1], device=dev)[None, :]
        cum = sorted_p.cumsum(dim=-1)
        drop = ranks >= top_k[:, None]
        drop |= (cum - sorted_p) > top_p[:, None]  # keep the smallest prefix reaching top_p
        drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        out = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        return out / out.sum(dim=-1, keepdim=True)
