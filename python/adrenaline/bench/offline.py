"""Offline throughput: Adrenaline's Engine vs HF transformers' batched ``generate``, same weights.

Both sides are timed the same way: a run with 1 new token (prefill + 1 sample) and a run with N
new tokens; prefill tok/s = B*P / t1, decode tok/s = B*(N-1) / (tN - t1). Prompts are random ids
(distinct per request, so no prefix reuse), EOS ignored.

    python -m adrenaline.bench.offline --dtype float32 bfloat16 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from adrenaline.models.default_model import resolve_model_path


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()


def time_ours(engine, ids: list[list[int]], n: int) -> float:
    t = time.perf_counter()
    engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    )
    return time.perf_counter() - t


@torch.inference_mode()
def time_hf(model, ids: list[list[int]], n: int) -> float:
    x = torch.tensor(ids)
    t = time.perf_counter()
    model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t


def measure(fn, target, batch: int, plen: int, n: int, vocab: int, reps: int) -> tuple[float, float]:
    """Best-of-``reps`` (prefill tok/s, decode tok/s)."""
    fn(target, prompts(batch, plen, vocab, seed=99), 2)  # warm-up
    best1 = bestn = float("inf")
    for r in range(reps):
        best1 = min(best1, fn(target, prompts(batch, plen, vocab, seed=2 * r), 1))
        bestn = min(bestn, fn(target, prompts(batch, plen, vocab, seed=2 * r + 1), n))
    return batch * plen / best1, batch * (n - 1) / max(bestn - best1, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from adrenaline import Engine

    path = resolve_model_path(args.model_path)
    print(
        f"model={path} threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
        f"torch={torch.__version__} prompt_len={args.prompt_len} new_tokens={args.new_tokens}"
    )
    header = (
        f"{'dtype':9} {'batch':>5} | {'ours prefill':>12} {'ours decode':>11} | {'HF prefill':>10} "
        f"{'HF decode':>9} | {'decode x':>8}"
    )
    print(header)
    print("-" * len(header))
    for dtype in args.dtype:
        engine = Engine(
            path,
            dtype=dtype,
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            max_total_tokens=max(args.batch_sizes) * (args.prompt_len + args.new_tokens + 32),
        )
        vocab = engine.runner.model_config.vocab_size
        hf = None
        if not args.skip_hf:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        for b in args.batch_sizes:
            op, od = measure(time_ours, engine, b, args.prompt_len, args.new_tokens, vocab, args.reps)
            hp = hd = float("nan")
            if hf is not None:
                hp, hd = measure(time_hf, hf, b, args.prompt_len, args.new_tokens, vocab, args.reps)
            print(
                f"{dtype:9} {b:5d} | {op:12.0f} {od:11.1f} | {hp:10.0f} {hd:9.1f} | {od / hd:7.2f}x",
                flush=True,
            )
        del engine, hf


if __name__ == "__main__":
    main()
