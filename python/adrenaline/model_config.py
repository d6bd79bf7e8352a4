"""Model architecture facts, read once from an HF ``config.json``.

The runner, KV pool and attention backends size themselves from this dataclass
rather than from the HF config object, so a future offloading executor (which
has no weights) can be built from the same few numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype, hf_dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn ``"auto"``/names into a torch dtype; ``auto`` keeps the checkpoint's dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if hf_dtype is None:
            return torch.float32
        return hf_dtype if isinstance(hf_dtype, torch.dtype) else _DTYPES.get(str(hf_dtype), torch.float32)
    aliases = {
        "fp32": "float32",
        "float": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
    }
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of auto, float32, bfloat16, float16")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    hf_config: Any = field(default=None, repr=False)

    @property
    def context_len(self) -> int:
        """Longest sequence we serve: a sliding window, when set, caps it (we attend fully)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        from transformers import AutoConfig, GenerationConfig

        hf = AutoConfig.from_pretrained(str(path))
        arch = (hf.architectures or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        eos = hf.eos_token_id
        try:
            gen_eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
            eos = gen_eos if gen_eos is not None else eos
        except OSError:
            pass
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope_params = getattr(hf, "rope_parameters", None) or {}
        rope_theta = getattr(hf, "rope_theta", None) or rope_params.get("rope_theta", 10000.0)
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            eos_token_ids=eos_ids,
            sliding_window=getattr(hf, "sliding_window", None)
            if getattr(hf, "use_sliding_window", True)
            else None,
            hf_config=hf,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (
            2
            * self.num_layers
            * self.num_kv_heads
            * self.head_dim
            * torch.empty((), dtype=dtype).element_size()
        )
