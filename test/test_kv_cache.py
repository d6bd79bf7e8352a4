"""KV accounting: allocator invariants, the pool is entirely free after finish/abort, retraction."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from adrenaline import Engine
from adrenaline.core.request import Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.kv_cache.allocator import OutOfPages, PageAllocator, page_hashes


def test_allocator_accounting_and_prefix_reuse():
    a = PageAllocator(num_pages=8, page_size=4)
    p1 = a.alloc(3)
    assert a.num_used == 3 and a.num_available == 5
    tokens = list(range(12))
    a.publish(p1, page_hashes(tokens, 4))
    a.free(p1)
    assert a.num_used == 0 and a.num_available == 8 and a.num_cached == 3
    hit = a.match_prefix(page_hashes(tokens[:10], 4))  # two full pages match
    assert hit == p1[:2] and a.num_used == 2
    with pytest.raises(OutOfPages):
        a.alloc(7)
    rest = a.alloc(6)  # evicts the one unreferenced cached page
    assert a.num_available == 0 and a.num_cached == 2
    a.free(hit + rest)
    with pytest.raises(RuntimeError):
        a.free(rest[:1])
    assert a.flush() and a.num_cached == 0 and a.num_available == 8


def test_freed_runs_come_back_as_runs_and_prefixes_lose_their_tail_first():
    """One-sided KV writes move a run of pages as one entry: recycling must not reverse runs."""
    a = PageAllocator(num_pages=8, page_size=4)
    first = a.alloc(5)
    assert first == [0, 1, 2, 3, 4]
    a.free(first)
    assert a.alloc(4) == [0, 1, 2, 3]
    a.free([0, 1, 2, 3])
    tokens = list(range(32))
    pages = a.alloc(8)
    a.publish(pages, page_hashes(tokens, 4))
    a.free(pages)
    a.alloc(3)  # evicts three cached pages: the prefix's last three
    assert a.match_prefix(page_hashes(tokens, 4)) == pages[:5]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


def test_pool_free_after_finish_and_abort(tiny):
    e = Engine(tiny, dtype="float32", max_total_tokens=1024, page_size=4, skip_tokenizer_init=True)
    s = e.scheduler
    prompts = random_prompts(6, 512, [10, 31, 17], seed=4)
    reqs = [
        Req(f"r{i}", p, SamplingParams(max_new_tokens=20, ignore_eos=True)) for i, p in enumerate(prompts)
    ]
    for r in reqs:
        s.add_request(r)
    for _ in range(3):
        s.step()
    assert s.allocator.num_used > 0
    s.abort("r1")
    s.abort("r4")
    while s.has_work:
        s.step()
    assert [r.finished_reason["type"] for r in reqs] == [
        "length",
        "abort",
        "length",
        "length",
        "abort",
        "length",
    ]
    assert s.allocator.num_used == 0
    assert s.allocator.num_available == s.allocator.num_pages


def test_retraction_under_tiny_pool_gives_same_tokens(tiny):
    prompts = random_prompts(8, 512, [20, 28, 12, 36], seed=5)
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    roomy = Engine(tiny, dtype="float32", max_total_tokens=4096, page_size=4, skip_tokenizer_init=True)
    tight = Engine(tiny, dtype="float32", max_total_tokens=160, page_size=4, skip_tokenizer_init=True)
    want = [o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)]
    got = [o["output_ids"] for o in tight.generate(input_ids=prompts, sampling_params=params)]
    assert got == want
    assert tight.scheduler.stats.retractions > 0
    assert tight.scheduler.allocator.num_used == 0


def test_prompt_too_long_is_rejected(tiny):
    e = Engine(tiny, dtype="float32", max_total_tokens=64, page_size=4, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="at most"):
        e.generate(input_ids=list(range(2, 100)), sampling_params={"max_new_tokens": 2})


def test_request_outgrowing_the_pool_ends_at_its_size(tiny):
    """Prompt + max_new_tokens beyond the whole pool: it stops with "length" when it fills the
    pool (like a context limit), next to a short request, and both are reported."""
    e = Engine(tiny, dtype="float32", max_total_tokens=64, page_size=4, skip_tokenizer_init=True)
    long, short = random_prompts(2, 512, [10, 6], seed=6)
    params = [
        {"max_new_tokens": 200, "ignore_eos": True},
        {"max_new_tokens": 8, "ignore_eos": True},
    ]
    outs = e.generate(input_ids=[long, short], sampling_params=params)
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["length", "length"]
    assert len(outs[0]["output_ids"]) == 64 - len(long)
    assert len(outs[1]["output_ids"]) == 8
    assert e.scheduler.allocator.num_used == 0


def test_admission_keeps_headroom_for_running_requests(tiny):
    """New requests wait while the running ones need their pages to grow: a pool that holds four
    full requests runs four at once, not as many prompts as fit, and retracts nothing."""
    prompts = random_prompts(8, 512, [8], seed=7)
    e = Engine(tiny, dtype="float32", max_total_tokens=4 * 40, page_size=4, skip_tokenizer_init=True)
    s = e.scheduler
    s.headroom.ratio = 1.0  # keep the full remaining length free
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    reqs = [Req(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for r in reqs:
        s.add_request(r)
    s.step()
    assert len(s.running) == 4 and len(s.waiting) == 4
    while s.has_work:
        s.step()
    assert s.stats.retractions == 0
    assert all(len(r.output_ids) == 32 for r in reqs)


def test_waiting_requests_hold_no_pages(tiny):
    """Two requests whose prompts are cached, each alone filling most of the pool: the one left
    waiting must not sit on its cached prefix pages, or the running one, retracted for lack of
    them, can never be admitted again (a deadlock)."""
    prompts = random_prompts(2, 512, [24], seed=9)
    e = Engine(tiny, dtype="float32", max_total_tokens=64, page_size=4, skip_tokenizer_init=True)
    e.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})  # caches both prompts
    s = e.scheduler
    s.headroom.ratio = 1.0
    reqs = [
        Req(f"r{i}", p, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    for r in reqs:
        s.add_request(r)
    for _ in range(500):
        if not s.has_work:
            break
        s.step()
    assert [len(r.output_ids) for r in reqs] == [30, 30]
    roomy = Engine(tiny, dtype="float32", max_total_tokens=1024, page_size=4, skip_tokenizer_init=True)
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    assert [r.output_ids for r in reqs] == [
        o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)
    ]
    assert s.allocator.num_used == 0
