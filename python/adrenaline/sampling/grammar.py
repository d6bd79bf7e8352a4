"""Structured output with xgrammar: one compiled grammar + matcher per constrained request."""

from __future__ import annotations

import torch

from adrenaline.core.sampling_params import SamplingParams


class Grammar:
    """A request's grammar state: which tokens may come next, advanced by each accepted token."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected token {token} that its own mask allowed")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def compile(self, p: SamplingParams) -> Grammar | None:
        """A fresh matcher for the request's constraint; ValueError for an invalid one."""
        try:
            if p.json_schema is not None:
                compiled = self.compiler.compile_json_schema(p.json_schema)
            elif p.regex is not None:
                compiled = self.compiler.compile_regex(p.regex)
            elif p.ebnf is not None:
                compiled = self.compiler.compile_grammar(p.ebnf)
            else:
                return None
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with a parser message
            kind = "json_schema" if p.json_schema is not None else "regex" if p.regex is not None else "ebnf"
            raise ValueError(f"invalid {kind}: {e}") from e
        return Grammar(self.xgr.GrammarMatcher(compiled))

    def apply(self, logits: torch.Tensor, rows: list[int], grammars: list[Grammar]) -> None:
        """Mask disallowed tokens to -inf in ``logits[rows]`` in place."""
        bitmask = self.xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for r, g in zip(rows, grammars):
            g.fill_mask(bitmask, r)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
