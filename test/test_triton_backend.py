"""The Triton attention backend equals the torch one: per layer on decode batches (mixed batches go
through the torch path), and end to end as the Engine's backend (greedy tokens). Without a GPU the
kernels run in Triton's interpreter (conftest), so the shapes stay small."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts
from test_attention_backends import run_backend

from adrenaline import Engine
from adrenaline.attention.base import AttentionBatch
from adrenaline.attention.triton_backend import DecodePlan
from sgl_kernel_ext.triton_ops import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no GPU and triton was imported before interpret_on_cpu", allow_module_level=True)


@pytest.mark.parametrize("seq_lens,extend_lens", [([1, 17, 33, 70], [1, 1, 1, 1]), ([37, 5, 20], [37, 1, 4])])
def test_triton_backend_matches_definition(seq_lens, extend_lens):
    out, ref = run_backend("triton", DEVICE, torch.float32, seq_lens, extend_lens)
    assert torch.allclose(out, ref, atol=1e-5)


def test_triton_decode_plan_pads_rows_and_width():
    batch = AttentionBatch([1, 1], [3, 20], [[7], [2, 5]], torch.tensor([7 * 16 + 2, 5 * 16 + 3]))
    plan = DecodePlan.build(batch, 16, num_splits=1, rows=4, width=3)
    assert plan.page_idx.tolist() == [[7, 0, 0], [2, 5, 0], [0, 0, 0], [0, 0, 0]]
    assert plan.seq_lens.tolist() == [3, 20, 0, 0] and plan.slots.tolist() == [114, 83, -1, -1]


def test_triton_backend_engine_tokens_equal_torch(tiny_model_factory):
    path = tiny_model_factory("llama")
    prompts = random_prompts(3, 512, [5, 19, 40], seed=3)
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    outs = {}
    for backend in ("torch", "triton"):
        e = Engine(
            path, dtype="float32", device=DEVICE, attention_backend=backend, max_total_tokens=1024,
            skip_tokenizer_init=True,
        )  # fmt: skip
        outs[backend] = [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=params)]
    assert outs["triton"] == outs["torch"]
