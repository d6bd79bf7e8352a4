"""Shared fixtures: the default model, tiny random-weight models, and the HF transformers oracle."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from sgl_kernel_ext.triton_ops import interpret_on_cpu

interpret_on_cpu()  # Triton kernels run in its interpreter without a GPU (before anything imports triton)

from adrenaline.models.default_model import default_model_path  # noqa: E402


@pytest.fixture(scope="session")
def default_model() -> str:
    return str(default_model_path())


def make_tiny_model(path, arch: str, seed: int = 0, **overrides) -> str:
    """Save a random-weight HF model of family ``arch`` (llama | qwen2 | mistral | llama3) to ``path``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, **common)
    elif arch == "mistral":
        cfg = MistralConfig(tie_word_embeddings=False, sliding_window=None, **common)
    elif arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = LlamaConfig(tie_word_embeddings=True, rope_parameters=rope, **common)
    else:
        cfg = LlamaConfig(tie_word_embeddings=True, **common)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return make


class HFOracle:
    """HF transformers on the same weights, greedy, one prompt at a time (no padding effects)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int, eos: int | None) -> list[int]:
        out = self.model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
        return out[0, len(ids) :].tolist()

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """log P(. | ids[:p+1]) for every position p: [len(ids), vocab]."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="session")
def hf_oracle_factory():
    cache: dict[str, HFOracle] = {}

    def make(path: str) -> HFOracle:
        if path not in cache:
            cache[path] = HFOracle(path)
        return cache[path]

    return make


def freeze(pid: int, timeout_s: float = 10) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped: ``kill`` returns before the
    signal lands, and a peer thread still running could complete the very transfer under test."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = Path(f"/proc/{pid}/task").glob("*/stat")
        states = [stat.read_text().rsplit(")", 1)[1].split()[0] for stat in stats]  # after "(comm)"
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop within {timeout_s} s")


def random_prompts(n: int, vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def engine():
    """The offline Engine on the default model in float32: the reference for server tests."""
    from adrenaline.engine import Engine

    eng = Engine(dtype="float32", max_total_tokens=4096)
    yield eng
    eng.shutdown()
