"""In-process Scheduler: bad parameters never reach a forward pass; a fault fails only its requests.

Faults are injected by wrapping the scheduler's sampler, finish checker, prompt-logprob recorder or
the runner's forward on one test's engine; production code has no fault hooks.
"""

from __future__ import annotations

import logging

import pytest
from conftest import random_prompts

from adrenaline import Engine
from adrenaline.core.request import Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.kv_cache.allocator import KVPoolCorrupted

VOCAB = 512
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = random_prompts(4, VOCAB, [5, 9, 14, 21], seed=3)
VICTIM = 1


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    eng = Engine(model, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True)
    return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture
def engine(model) -> Engine:
    return Engine(model, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True)


# ---- validation before any forward pass -------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"return_logprob": True, "top_logprobs_num": 10_000_000}, "top_logprobs_num"),
        ({"return_logprob": True, "top_logprobs_num": VOCAB + 1}, "top_logprobs_num"),
        ({"return_logprob": True, "top_logprobs_num": -3}, "top_logprobs_num"),
        ({"return_logprob": True, "logprob_start_len": -7}, "logprob_start_len"),
        ({"return_logprob": True, "logprob_start_len": 6}, "logprob_start_len"),
        ({"sampling_params": {"temperature": float("nan")}}, "temperature"),
        ({"sampling_params": {"temperature": float("inf")}}, "temperature"),
        ({"sampling_params": {"top_k": 2.5}}, "top_k"),
        ({"sampling_params": {"sampling_seed": 2**70}}, "sampling_seed"),
        ({"sampling_params": {"stop_token_ids": [VOCAB]}}, "stop_token_ids"),
        ({"input_ids": [1, 2, VOCAB]}, "input_ids"),
        ({"input_ids": [1, -2]}, "input_ids"),
    ],
)
def test_bad_parameters_are_rejected_before_any_forward(engine, kwargs, needle):
    kwargs = {"input_ids": [3, 4, 5, 6, 7], **kwargs}
    params = SamplingParams(**{"max_new_tokens": 2, **kwargs.pop("sampling_params", {})})
    req = Req("bad", kwargs.pop("input_ids"), params, **kwargs)
    with pytest.raises(ValueError, match=needle):
        engine.scheduler.add_request(req)
    assert not engine.scheduler.has_work and engine.scheduler.stats.forward_passes == 0


def test_top_logprobs_at_vocab_size_and_start_at_prompt_end_are_served(engine):
    out = engine.generate(input_ids=[3, 4, 5], sampling_params={"max_new_tokens": 1},
                          return_logprob=True, top_logprobs_num=VOCAB, logprob_start_len=3)  # fmt: skip
    assert len(out["meta_info"]["output_top_logprobs"][0]) == VOCAB
    assert "input_token_logprobs" not in out["meta_info"]  # start == prompt length: none, as SGLang


# ---- per-request faults -------------------------------------------------------------------------------
class Injected(RuntimeError):
    pass


def _fail_for_victim(fn, is_victim):
    def wrapped(*args):
        if is_victim(*args):
            raise Injected("injected fault")
        return fn(*args)

    return wrapped


def _inject(engine: Engine, where: str) -> None:
    s = engine.scheduler.outputs  # the scheduler's per-step output stage
    victim = PROMPTS[VICTIM]
    if where == "sampler":  # the batch raises, then only the victim's row
        s.sampler = _fail_for_victim(
            s.sampler, lambda logits, rows: any(r.prompt_ids == victim for r in rows)
        )
    elif where == "finish":  # taking the victim's third token
        s.finish.check = _fail_for_victim(
            s.finish.check, lambda req: req.input_ids == victim and len(req.output_ids) == 3
        )
    elif where == "prompt_logprobs":
        s._record_prompt_logprobs = _fail_for_victim(
            s._record_prompt_logprobs, lambda req, logits: req.input_ids == victim
        )


@pytest.mark.parametrize("where", ["sampler", "finish", "prompt_logprobs"])
def test_a_fault_fails_only_its_request(engine, reference, where, caplog):
    _inject(engine, where)
    with caplog.at_level(logging.ERROR, logger="adrenaline.scheduler.faults"):
        outs = engine.generate(
            input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0
        )
    reason = outs[VICTIM]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 500
    assert "Injected: injected fault" in reason["message"]
    assert any(r.levelno == logging.ERROR and "injected fault" in r.getMessage() for r in caplog.records)
    for i, out in enumerate(outs):
        if i != VICTIM:
            assert out["output_ids"] == reference[i]
            assert out["meta_info"]["finish_reason"] == {"type": "length", "length": GREEDY["max_new_tokens"]}
    assert engine.scheduler.allocator.num_used == 0 and not engine.scheduler.has_work


def test_a_failed_forward_fails_its_batch_and_serving_goes_on(engine, reference):
    s = engine.scheduler
    first = [Req(f"r{i}", PROMPTS[i], SamplingParams(**GREEDY)) for i in (0, 1)]
    for r in first:
        s.add_request(r)
    s.step()  # both prefilled
    forward = engine.runner.forward
    engine.runner.forward = _fail_for_victim(forward, lambda *args: True)
    failed = s.step()
    assert failed == first
    assert all(
        r.finished_reason["status_code"] == 500 and "injected" in r.finished_reason["message"] for r in first
    )
    assert s.allocator.num_used == 0 and not s.has_work
    engine.runner.forward = forward
    later = engine.generate(input_ids=PROMPTS[2:], sampling_params=GREEDY)
    assert [o["output_ids"] for o in later] == reference[2:]
    assert s.allocator.num_used == 0


@pytest.mark.parametrize(
    "exc", [KVPoolCorrupted("double free of page 3"), RuntimeError("CUDA error: an illegal memory access")]
)
def test_fatal_errors_end_the_scheduler(engine, exc, caplog):
    engine.scheduler.add_request(Req("r", PROMPTS[0], SamplingParams(**GREEDY)))

    def broken(*args):
        raise exc

    engine.runner.forward = broken
    with caplog.at_level(logging.CRITICAL), pytest.raises(type(exc)):
        engine.scheduler.step()
    assert any(
        "fatal error in a forward pass" in r.getMessage() and "exits" in r.getMessage()
        for r in caplog.records
    )
