"""Output, top-k and prompt logprobs within 1e-4 of HF transformers (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from adrenaline import Engine

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    return Engine(
        tiny_model_factory("qwen2"),
        dtype="float32",
        max_total_tokens=2048,
        page_size=4,
        chunked_prefill_size=16,
        skip_tokenizer_init=True,
    )


@pytest.mark.parametrize("start", [0, 5])
def test_logprobs_match_hf(engine, tiny_model_factory, hf_oracle_factory, start):
    oracle = hf_oracle_factory(tiny_model_factory("qwen2"))
    prompts = random_prompts(3, 512, [9, 23, 40], seed=start)
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=start,
        top_logprobs_num=3,
    )
    for ids, out in zip(prompts, outs):
        full = ids + out["output_ids"]
        ref = oracle.logprobs(full)  # ref[p] = log P(. | full[:p+1])
        meta = out["meta_info"]
        # output tokens: token at position len(ids)+j is scored by row len(ids)+j-1
        for j, (lp, tok) in enumerate(meta["output_token_logprobs"]):
            row = len(ids) + j - 1
            assert tok == full[row + 1]
            assert abs(lp - ref[row, tok].item()) < TOL
            top = meta["output_top_logprobs"][j]
            want_v, want_i = ref[row].topk(3)
            assert [t for _, t in top] == want_i.tolist()
            assert torch.allclose(torch.tensor([v for v, _ in top]), want_v, atol=TOL)
        # prompt tokens from `start`; the very first token has no score
        inp = meta["input_token_logprobs"]
        assert [t for _, t in inp] == ids[start:]
        for k, (lp, tok) in enumerate(inp):
            pos = start + k
            if pos == 0:
                assert lp is None
                continue
            assert abs(lp - ref[pos - 1, tok].item()) < TOL
            top = meta["input_top_logprobs"][k]
            assert [t for _, t in top] == ref[pos - 1].topk(3).indices.tolist()


def test_max_new_tokens_zero_returns_prompt_logprobs(engine, tiny_model_factory, hf_oracle_factory):
    oracle = hf_oracle_factory(tiny_model_factory("qwen2"))
    ids = random_prompts(1, 512, [30], seed=9)[0]
    out = engine.generate(
        input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )
    assert out["output_ids"] == []
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    ref = oracle.logprobs(ids)
    got = [lp for lp, _ in out["meta_info"]["input_token_logprobs"]]
    assert got[0] is None and len(got) == len(ids)
    want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(got[1:], want)) < TOL
