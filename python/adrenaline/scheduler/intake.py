"""A request on its way in: rejected when it can never be served, else given its sampling state
(compiled grammar, seeded generator) before it queues."""

from __future__ import annotations

import torch

from adrenaline.core.request import Req
from adrenaline.sampling.grammar import GrammarCompiler
from adrenaline.scheduler.validate import check_request


class Intake:
    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        grammar: GrammarCompiler | None,
        has_tokenizer: bool,
        device: torch.device,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.grammar = grammar
        self.has_tokenizer = has_tokenizer
        self.device = device

    def validate(self, req: Req) -> None:
        """Raise ValueError (a client error) for a request that can never be served."""
        check_request(req, self.vocab_size)
        n = len(req.input_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; this server accepts at most {self.max_seq_len - 1}")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in req.input_ids):
            raise ValueError(f"input_ids must be in [0, {vocab})")
        req.params.verify(vocab)
        if self.grammar is None and (req.params.regex or req.params.json_schema or req.params.ebnf):
            raise ValueError("structured output needs a tokenizer; this server runs with skip_tokenizer_init")
        if not self.has_tokenizer and req.params.stop:
            raise ValueError("stop strings need a tokenizer; this server runs with skip_tokenizer_init")
        if req.logprob_start_len > n:  # == n: no prompt logprobs, as in SGLang
            raise ValueError(
                f"logprob_start_len ({req.logprob_start_len}) must be at most the prompt length ({n})"
            )

    def prepare(self, req: Req) -> None:
        """Validate and set up sampling state."""
        self.validate(req)
        if self.grammar is not None:
            req.grammar = self.grammar.compile(req.params)
        if req.params.sampling_seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.params.sampling_seed)
        if req.wants_prompt_logprobs and req.logprob_start_len == 0:
            req.input_logprobs.append(None)  # the first token has no score
            req.input_top_logprobs.append(None)
