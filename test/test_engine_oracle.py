"""Greedy tokens identical to HF transformers (the correctness oracle), fp32."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from adrenaline import Engine

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain, in one long sentence, why the sky looks blue during the day and red at sunset.",
    "Hi",
    "Translate to French: I like apples and oranges, but I do not like bananas at all.",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
]


@pytest.fixture(scope="module")
def default_engine(default_model):
    return Engine(default_model, dtype="float32", max_total_tokens=8192)


def test_default_model_matches_hf_batched(default_engine, default_model, hf_oracle_factory):
    tok = default_engine.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    ids = [tok.encode(p) for p in prompts]
    assert len({len(x) for x in ids}) >= 6, "prompts must differ in length"
    outs = default_engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 32})
    oracle = hf_oracle_factory(default_model)
    eos = default_engine.runner.model_config.eos_token_ids[0]
    for x, out in zip(ids, outs):
        assert out["output_ids"] == oracle.greedy(x, 32, eos)
    assert "Paris" in outs[0]["text"]
    assert default_engine.scheduler.allocator.num_used == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama3"])
def test_tiny_models_match_hf(arch, tiny_model_factory, hf_oracle_factory):
    path = tiny_model_factory(arch)
    engine = Engine(path, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True)
    prompts = random_prompts(8, 512, [3, 7, 12, 20, 33, 50, 64, 90])
    outs = engine.generate(
        input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    )
    oracle = hf_oracle_factory(path)
    for x, out in zip(prompts, outs):
        assert out["output_ids"] == oracle.greedy(x, 32, None), (
            f"{arch} diverged for prompt of length {len(x)}"
        )


def test_chunked_prefill_matches_unchunked(tiny_model_factory):
    path = tiny_model_factory("llama")
    prompts = random_prompts(4, 512, [40, 75, 130, 9], seed=1)
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    whole = Engine(
        path,
        dtype="float32",
        max_total_tokens=2048,
        page_size=4,
        chunked_prefill_size=1024,
        skip_tokenizer_init=True,
    )
    chunked = Engine(
        path,
        dtype="float32",
        max_total_tokens=2048,
        page_size=4,
        chunked_prefill_size=16,
        skip_tokenizer_init=True,
    )
    a = whole.generate(input_ids=prompts, sampling_params=params)
    b = chunked.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert chunked.scheduler.stats.forward_passes > whole.scheduler.stats.forward_passes


def test_prefix_reuse_same_tokens_fewer_computed(tiny_model_factory):
    path = tiny_model_factory("llama")
    shared = random_prompts(1, 512, [96], seed=2)[0]
    tails = random_prompts(3, 512, [5, 9, 14], seed=3)
    prompts = [shared + t for t in tails]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    cached = Engine(path, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True)
    plain = Engine(
        path,
        dtype="float32",
        max_total_tokens=2048,
        page_size=4,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
    )
    got, want = [], []
    for p in prompts:  # one after another so later prompts find the shared prefix cached
        got.append(cached.generate(input_ids=p, sampling_params=params))
        want.append(plain.generate(input_ids=p, sampling_params=params))
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["meta_info"]["cached_tokens"] for o in got[1:]] == [96, 96]
    computed, baseline = (
        cached.scheduler.stats.prompt_tokens_computed,
        plain.scheduler.stats.prompt_tokens_computed,
    )
    assert baseline == sum(len(p) for p in prompts)
    assert computed == baseline - 2 * 96
