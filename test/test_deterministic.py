"""``--enable-deterministic-inference``: a request's greedy tokens do not depend on what shares its
batch, how its prompt was chunked, or where its attention ran, in bf16 too.

Without the mode, low-precision greedy outputs can change with batch composition (seen: 7 of 32
bf16 prompts differed alone vs together on an AMD EPYC Zen 4; the causes are GEMM kernels chosen
by row count and chunk-dependent attention reductions). The mode must remove that, and stay exact:
float32 outputs still equal HF's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts
from server_utils import Server, generate, generate_all
from test_offload_hook import InProcessRemote

from adrenaline import Engine
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.kv_cache.pool import KVPool
from sgl_kernel_ext import ops

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture
def batch_invariant():
    ops.set_batch_invariant(True)
    yield
    ops.set_batch_invariant(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_row_does_not_depend_on_row_count(batch_invariant, dtype):
    torch.manual_seed(0)
    w = torch.randn(1536, 576, dtype=dtype)
    packed = ops.pack_linear_weight(w)
    x = torch.randn(576, dtype=dtype)
    got = []
    for m in (1, 3, 16, 17, 40, 130):
        xs = torch.randn(m, 576, dtype=dtype)
        xs[m // 2] = x
        got.append(ops.linear(xs, packed if packed is not None else w)[m // 2])
    assert all(torch.equal(got[0], g) for g in got[1:])
    assert torch.allclose(got[0].float(), (x.float() @ w.float().T), rtol=2e-2, atol=2e-1)


def test_float32_still_equals_hf(tiny_model_factory, hf_oracle_factory):
    path = tiny_model_factory("llama")
    prompts = random_prompts(4, 512, [5, 19, 33, 48], seed=3)
    eng = Engine(
        path, dtype="float32", page_size=4, chunked_prefill_size=16, max_total_tokens=1024,
        skip_tokenizer_init=True, enable_deterministic_inference=True,
    )  # fmt: skip
    try:
        got = eng.generate(input_ids=prompts, sampling_params=GREEDY)
    finally:
        eng.shutdown()
    oracle = hf_oracle_factory(path)
    assert [g["output_ids"] for g in got] == [oracle.greedy(p, 12, None) for p in prompts]


def test_bf16_alone_equals_in_a_batch_of_16():
    prompts = random_prompts(16, 49152, [8, 23, 41, 70, 97, 120], seed=21)
    # small chunks: in the batch, prompts are split at other places than when served alone
    eng = Engine(dtype="bfloat16", chunked_prefill_size=64, enable_deterministic_inference=True)
    try:
        together = eng.generate(input_ids=prompts, sampling_params=GREEDY)
        alone = [eng.generate(input_ids=[p], sampling_params=GREEDY)[0] for p in prompts]
    finally:
        eng.shutdown()
    assert [a["output_ids"] for a in alone] == [t["output_ids"] for t in together]


def test_bf16_offloaded_equals_local():
    """Half the requests' attention on a stand-in executor (its own pool and backend, the same
    decode kernel the real executor runs): the same bf16 tokens as all-local."""
    prompts = random_prompts(8, 49152, [9, 33, 60, 17], seed=4)
    # no prefix reuse: the second run's offloaded prompts must not find their pages in the local pool
    kw = dict(dtype="bfloat16", max_total_tokens=4096, enable_prefix_caching=False)
    eng = Engine(**kw, enable_deterministic_inference=True)
    try:
        want = eng.generate(input_ids=prompts, sampling_params=GREEDY)
        mc = eng.runner.model_config
        pool = KVPool(mc, eng.runner.pool.num_pages, eng.runner.page_size, torch.bfloat16, "cpu")
        remote = InProcessRemote(TorchAttentionBackend(pool, mc.num_heads, mc.num_kv_heads, mc.head_dim))
        offloaded = {f"offline-{i}" for i in range(9, 16, 2)}  # every other one of the second run
        schedule, forward = eng.scheduler.schedule, eng.runner.forward

        def local_first():
            return sorted(schedule(), key=lambda it: it.req.rid in offloaded)

        def split_forward(batch, _remote=None):
            batch.num_local = sum(it.req.rid not in offloaded for it in batch.items)
            return forward(batch, remote)

        eng.scheduler.schedule, eng.runner.forward = local_first, split_forward
        got = eng.generate(input_ids=prompts, sampling_params=GREEDY)
    finally:
        eng.shutdown()
    assert remote.layers_seen > 0
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]


def test_server_flag_bf16_alone_equals_together(tmp_path):
    """SGLang's flag on ``launch_server`` (our scheduler takes it over; SGLang's front end would
    refuse it on CPU): bf16 prompts served one at a time get the tokens they get all at once."""
    prompts = random_prompts(8, 49152, [8, 23, 41, 70], seed=5)
    flags = ("--dtype", "bfloat16", "--chunked-prefill-size", "64", "--enable-deterministic-inference")
    with Server(tmp_path, *flags) as server:
        together = generate_all(server.url, prompts, [GREEDY] * len(prompts))
        alone = [generate(server, input_ids=p, sampling_params=GREEDY).json() for p in prompts]
    assert [a["output_ids"] for a in alone] == [t["output_ids"] for t in together]
