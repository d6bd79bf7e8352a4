"""Load an HF model directory (config.json + safetensors, sharded or not) into our model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from adrenaline.model_config import ModelConfig
from adrenaline.models.llama import LlamaForCausalLM

# Every supported architecture is a Llama-family decoder; Qwen2 differs only by qkv bias.
MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def _iter_safetensors(path: Path, show_progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (only safetensors checkpoints are supported)")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += len(st.keys())
    with tqdm(total=total, desc=f"Loading {path.name}", unit="tensor", disable=not show_progress) as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
                    bar.update(1)


def load_model(
    model_path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    show_progress: bool = True,
) -> LlamaForCausalLM:
    path = Path(model_path)
    with torch.device("meta"):  # no random init: every parameter is overwritten by the checkpoint
        model = MODEL_CLASSES[cfg.architecture](cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(_iter_safetensors(path, show_progress))
    model.cos_sin = LlamaForCausalLM.rope_cache(cfg).to(device)  # stays float32, like HF's
    model.pack_linear_weights()
    return model.eval()
