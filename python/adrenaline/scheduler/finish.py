"""When a request stops: length, EOS, stop token ids, stop strings, grammar end, context limit."""

from __future__ import annotations

from typing import Any

from adrenaline.core.request import Req, finish_length, finish_stop


class FinishChecker:
    def __init__(self, tokenizer, eos_token_ids: list[int], context_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.context_len = context_len

    def check(self, req: Req) -> dict[str, Any] | None:
        p = req.params
        n = len(req.output_ids)
        last = req.output_ids[-1]
        if n >= p.min_new_tokens:
            if last in p.stop_token_ids or (not p.ignore_eos and last in self.eos):
                return finish_stop(last)
            if req.grammar is not None and req.grammar.terminated:
                return finish_stop(last)
            if p.stop and self.tokenizer is not None and (s := self._stop_string(req)) is not None:
                return finish_stop(s)
        if n >= p.max_new_tokens:
            return finish_length(p.max_new_tokens)
        if req.seq_len >= self.context_len:
            return finish_length(n)
        return None

    def _stop_string(self, req: Req) -> str | None:
        """A stop string in the text of the newest tokens (a token is at least one character)."""
        window = max(len(s) for s in req.params.stop) + 1
        tail = self.tokenizer.decode(
            req.output_ids[-window:], skip_special_tokens=req.params.skip_special_tokens
        )
        for s in req.params.stop:
            if s in tail:
                return s
        return None
