"""Llama-family decoder (Llama, Llama-3 rope scaling, Qwen2 with qkv bias, Mistral) over a flat,
unpadded token batch: prefill chunks of several requests and decode tokens side by side.

QKV and gate/up projections are fused into single GEMMs; attention goes through whatever callable
the runner passes (``SplitAttention``), which is where the offload hook lives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from adrenaline.model_config import ModelConfig
from sgl_kernel_ext import apply_rope, fused_add_rms_norm, linear, rms_norm, rope_cos_sin_cache, silu_and_mul
from sgl_kernel_ext.ops import pack_linear_weight, rope_rows

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        attention: AttentionFn,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope``: ``rope_rows`` of this forward pass, shared by every layer."""
        h, residual = self.input_layernorm(x, residual)
        q, k, v = linear(h, self.qkv_proj.weight, self.qkv_proj.bias).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1
        )
        t = q.shape[0]
        q, k = apply_rope(q.view(t, self.nh, self.hd), k.view(t, self.nkv, self.hd), positions, cos_sin, rope)
        o = attention(self.layer_id, q, k, v.view(t, self.nkv, self.hd))
        h = linear(o.reshape(t, self.q_size).to(x.dtype), self.o_proj.weight)
        h, residual = self.post_attention_layernorm(h, residual)
        return linear(silu_and_mul(linear(h, self.gate_up_proj.weight)), self.down_proj.weight), residual


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names of the unfused projections -> (our fused param, shard index)
    STACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("cos_sin", self.rope_cache(cfg), persistent=False)

    @staticmethod
    def rope_cache(cfg: ModelConfig) -> torch.Tensor:
        """cos|sin table from HF's own rope initialisers (default, llama3, linear, yarn, ...)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = cfg.hf_config
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        with torch.device("cpu"):  # also when the model itself is being built on the meta device
            if rope_type == "default":
                exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
                inv_freq, scale = 1.0 / (cfg.rope_theta**exponent), 1.0
            else:
                inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
            return rope_cos_sin_cache(inv_freq, cfg.max_position_embeddings, scale)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) of the rows ``logits_rows`` of the flat token batch (all rows when None)."""
        x = self.embed_tokens(input_ids)
        residual = None
        rope = rope_rows(positions, self.cos_sin, x.dtype)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, attention, rope)
        x, _ = self.norm(x, residual)
        if logits_rows is not None:
            x = x[logits_rows]
        return linear(x, self.lm_head.weight).float()

    def pack_linear_weights(self) -> None:
        """Swap each projection's weight for its packed form where ``pack_linear_weight`` applies.

        No second copy is kept, except for a tied LM head: the embedding lookup needs the plain one.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear) and (packed := pack_linear_weight(module.weight)) is not None:
                module.weight = nn.Parameter(packed, requires_grad=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            name = name.replace("self_attn.", "").replace("mlp.", "")
            parts = name.split(".")
            fused = self.STACKED.get(parts[-2]) if len(parts) >= 2 else None
            if fused is not None:
                target, shard = fused
                name = ".".join([*parts[:-2], target, parts[-1]])
                self._load_shard(params[name], w, target, shard)
            elif name in params:
                params[name].data.copy_(w)
            else:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            loaded.add(name)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.cfg.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}...")

    def _load_shard(self, param: torch.Tensor, w: torch.Tensor, target: str, shard: int) -> None:
        if target == "qkv_proj":
            q, kv = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
            offsets, sizes = [0, q, q + kv], [q, kv, kv]
        else:
            inter = self.cfg.intermediate_size
            offsets, sizes = [0, inter], [inter, inter]
        param.data.narrow(0, offsets[shard], sizes[shard]).copy_(w)
