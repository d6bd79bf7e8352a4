"""The model as the cost model sees it: sizes from an HF ``config.json``, no weights.

Llama-2-7B/13B and Llama-3-8B/70B configs are written inline (the fields that set sizes, as in
their published ``config.json``), so planning needs neither a download nor a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "max_position_embeddings": 4096}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "max_position_embeddings": 8192}

INLINE_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    # the project's default model (SmolLM2-135M-Instruct), for measured CPU profiles
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "tie_word_embeddings": True, "max_position_embeddings": 8192},
}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    max_context: int = 4096
    dtype_bytes: int = 2  # bf16/fp16 weights and KV

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> ModelSpec:
        heads = cfg["num_attention_heads"]
        return cls(
            name=name,
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_context=cfg.get("max_position_embeddings", 4096),
        )

    @classmethod
    def load(cls, name_or_path: str) -> ModelSpec:
        """An inline name (``llama-2-7b``), a ``config.json`` or a directory holding one."""
        if name_or_path.lower() in INLINE_CONFIGS:
            return cls.from_config(name_or_path.lower(), INLINE_CONFIGS[name_or_path.lower()])
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            known = sorted(INLINE_CONFIGS)
            raise ValueError(f"unknown model {name_or_path!r}: not one of {known} nor a config.json")
        return cls.from_config(path.parent.name or path.stem, json.loads(path.read_text()))

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        q_out = self.heads * self.head_dim
        kv_out = 2 * self.kv_heads * self.head_dim
        return self.hidden * (q_out + kv_out) + q_out * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token: every layer's projections and the LM head."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return (self.layers * self.layer_params + embeddings) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def exchange_bytes_per_row(self) -> int:
        """Per layer, one offloaded request ships q, k, v out and gets the attention output back."""
        return (2 * self.heads + 2 * self.kv_heads) * self.head_dim * self.dtype_bytes
