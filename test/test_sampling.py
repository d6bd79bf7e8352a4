"""Sampling: filters, penalties, seeds, min/max tokens, stop ids and strings."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from adrenaline import Engine
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.sampling.sampler import Sampler, SampleRow


def row(**kw) -> SampleRow:
    return SampleRow(params=SamplingParams(**kw), prompt_ids=[1, 2], output_ids=[3, 3, 4])


def test_filters_keep_the_expected_support():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    keep = lambda **kw: (Sampler._filter(probs, [SamplingParams(**kw)])[0] > 0).nonzero().flatten().tolist()
    assert keep(top_k=2) == [0, 1]
    assert keep(top_p=0.6) == [0, 1]  # smallest prefix with mass >= 0.6
    assert keep(top_p=0.45) == [0]
    assert keep(min_p=0.25) == [0, 1, 2]  # >= 0.25 * 0.5
    out = Sampler._filter(probs, [SamplingParams(top_k=3)])[0]
    assert torch.allclose(out.sum(), torch.tensor(1.0))


def test_penalties_match_reference_semantics():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 16)
    s = Sampler(16, [0])
    got = logits.clone()
    s._penalise(got, [row(repetition_penalty=1.3)])
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, 3, 3, 4]]), logits.clone())
    assert torch.allclose(got, want)
    got = logits.clone()
    s._penalise(got, [row(frequency_penalty=0.5, presence_penalty=0.25)])
    want = logits.clone()
    want[0, 3] -= 2 * 0.5 + 0.25
    want[0, 4] -= 0.5 + 0.25
    assert torch.allclose(got, want)


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    s = Sampler(3, [])
    gen = torch.Generator().manual_seed(0)
    r = SampleRow(params=SamplingParams(temperature=1.0), prompt_ids=[], output_ids=[], generator=gen)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[s(logits.clone(), [r]).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_factory):
    return Engine(
        tiny_model_factory("llama"),
        dtype="float32",
        max_total_tokens=2048,
        page_size=4,
        skip_tokenizer_init=True,
    )


def test_seeds_reproducible_and_top_k_1_is_greedy(tiny_engine):
    ids = random_prompts(1, 512, [12], seed=11)[0]
    sample = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}
    a = tiny_engine.generate(input_ids=[ids, ids], sampling_params=[{**sample, "sampling_seed": 1}] * 2)
    assert a[0]["output_ids"] == a[1]["output_ids"]
    b = tiny_engine.generate(input_ids=ids, sampling_params={**sample, "sampling_seed": 2})
    assert b["output_ids"] != a[0]["output_ids"]
    greedy = tiny_engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    )
    top1 = tiny_engine.generate(input_ids=ids, sampling_params={**sample, "top_k": 1})
    assert top1["output_ids"] == greedy["output_ids"]


def test_stop_token_ids_and_length(tiny_engine):
    ids = random_prompts(1, 512, [12], seed=12)[0]
    base = tiny_engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    )
    assert len(base["output_ids"]) == 20 and base["meta_info"]["finish_reason"]["type"] == "length"
    stop = base["output_ids"][6]
    cut = base["output_ids"].index(stop) + 1
    out = tiny_engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 20, "stop_token_ids": [stop]}
    )
    assert out["output_ids"] == base["output_ids"][:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_min_new_tokens_blocks_eos_and_stop_strings(default_model):
    e = Engine(default_model, dtype="float32", max_total_tokens=2048)
    chat = e.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    short = e.generate(chat, {"temperature": 0, "max_new_tokens": 40})
    assert short["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    n = short["meta_info"]["completion_tokens"]
    longer = e.generate(chat, {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": n + 5})
    assert longer["meta_info"]["completion_tokens"] >= n + 5
    assert 2 not in longer["output_ids"][: n + 4]
    stopped = e.generate(chat, {"temperature": 0, "max_new_tokens": 40, "stop": ["France"]})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "France"}
    assert "France" not in stopped["text"] and short["text"].startswith(stopped["text"])


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_new_tokens": -1},
        {"top_k": 0},
        {"bogus": 1},
        {"min_p": 2},
    ],
)
def test_invalid_params_raise_clear_errors(bad):
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict(bad)
    assert next(iter(bad)) in str(e.value)
