"""The GPU check: every GPU path proven and measured in one run (``scripts/gpu_check.sh``).

    python scripts/gpu_check.py --out DIR [--device cuda|cpu] [--model-path DIR] [--executor-sm-percent P]

Writes ``DIR/results.json`` and ``DIR/results.md``. Each section records its status (``ok``,
``fail``, ``skipped`` with the reason, ``error`` with the exception) and its figures; one failing
section does not stop the others. With ``--device cpu`` the same code runs on tiny shapes with the
Triton kernels in Triton's interpreter, so a first GPU run meets GPU problems only; its figures mean
nothing. Sections: pytest -m gpu; greedy tokens on the device equal to CPU fp32; an executor
process sharing its pool (CUDA IPC) giving the tokens of all-local; per-layer exchange latency vs
local attention; the offloaded decode step vs all-local under CUDA graphs; HBM bandwidth of the
decode kernel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

from sgl_kernel_ext.triton_ops import interpret_on_cpu  # noqa: E402

interpret_on_cpu()  # without a GPU: before transformers imports triton

import torch  # noqa: E402
from gpu_check_bench import decode_bandwidth, exchange_latency, step_overhead  # noqa: E402

# Published HBM peaks (bytes/s) where the device properties give no memory clock.
PEAK_HBM = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    props = torch.cuda.get_device_properties(device)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * width / 8, "device properties"
    for name, bw in PEAK_HBM.items():
        if name in props.name:
            return bw, "datasheet"
    return None, "unknown"


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "missing_packages": [
            n
            for n in ("sglang", "flashinfer", "zmq", "msgspec", "xgrammar")
            if not importlib.util.find_spec(n)
        ],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    env["peak_hbm_bytes_per_s"], env["peak_source"] = peak_bandwidth(device)
    return env


def make_model(path: Path, tiny: bool) -> str:
    """Random weights in the default model's shapes (SmolLM2-135M: 30 layers, 9/3 heads of 64), or
    tiny ones for the CPU run; the tokens are compared between devices, not read."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = (
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        if tiny
        else dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    )  # fmt: skip
    cfg = LlamaConfig(
        **shape, rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.2, eos_token_id=1
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    return str(path)


def resolve_model(args, workdir: Path) -> tuple[str, str]:
    if args.model_path:
        return args.model_path, "given"
    if args.device == "cuda":
        try:
            from adrenaline.models.default_model import default_model_path

            return str(default_model_path()), "default model (SmolLM2-135M-Instruct)"
        except Exception as e:  # not installed on a bare image, and too big to carry (see docs/gpu.md)
            print(f"default model unavailable ({e}); random weights in its shapes", flush=True)
    return make_model(workdir / "model", tiny=args.device == "cpu"), "random weights"


def prompts_for(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 33, 120, 250, 500]
    return [torch.randint(2, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def engine(path: str, device: str, dtype: str, backend: str, **kw):
    from adrenaline import Engine

    return Engine(
        path, device=device, dtype=dtype, attention_backend=backend, skip_tokenizer_init=True,
        max_total_tokens=kw.pop("max_total_tokens", 16384), **kw,
    )  # fmt: skip


def greedy(e, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    return [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=params)]


def section_pytest(args) -> dict:
    # Modules needing the front end (sglang, pyzmq) cannot be collected on a bare image: counted, not fatal.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "test", "-q", "-p", "no:cacheprovider", "-rfE"]
    cmd.append("--continue-on-collection-errors")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout)
    log = Path(args.out) / "pytest_gpu.log"
    log.write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines() or [""]
    summary = lines[-1]
    failed = [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]
    uncollected = [ln.split()[1] for ln in lines if ln.startswith("ERROR ")]
    status = "ok" if not failed and proc.returncode in (0, 1, 5) else "fail"
    return {
        "status": status,
        "summary": summary,
        "failed": failed,
        "not_collected": uncollected,
        "log": log.name,
    }  # noqa: E501


def section_tokens(args, path: str) -> dict:
    """Greedy tokens on the device (Triton backend, CUDA graphs) against CPU fp32 (torch backend)."""
    cpu = engine(path, "cpu", "float32", "torch")
    prompts = prompts_for(cpu.runner.model_config.vocab_size, args.prompts)
    want = greedy(cpu, prompts, args.new_tokens)
    del cpu
    out = {"prompts": len(prompts), "new_tokens": args.new_tokens}
    for dtype in ("float32", "bfloat16"):
        got = greedy(engine(path, args.device, dtype, "triton"), prompts, args.new_tokens)
        same = sum(g == w for g, w in zip(got, want))
        prefix = [
            next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w)) for g, w in zip(got, want)
        ]
        out[dtype] = {"identical_prompts": same, "first_divergence": prefix}
    out["status"] = "ok" if out["float32"]["identical_prompts"] == len(prompts) else "fail"
    out["note"] = "float32 must match exactly; bfloat16 is reported (rounding may flip a near tie)"
    return out


def section_executor(args, path: str) -> dict:
    """An executor process over a pool shared with this one; some requests decode there."""
    from adrenaline.colocated import ColocatedOffload

    transport = "tcp" if importlib.util.find_spec("zmq") and importlib.util.find_spec("msgspec") else "socket"
    backend = "triton" if args.device == "cuda" else "torch"  # a child process cannot use the interpreter
    e = engine(path, args.device, "float32", backend)
    prompts = prompts_for(e.runner.model_config.vocab_size, args.prompts, seed=1)
    want = greedy(e, prompts, args.new_tokens)
    colocated = ColocatedOffload(e, transport=transport, sm_percent=args.executor_sm_percent)
    try:
        tic = time.perf_counter()
        got = colocated.generate(prompts, args.new_tokens, offload=set(range(0, len(prompts), 2)))
        seconds = time.perf_counter() - tic
    finally:
        colocated.close()
    same = sum(g == w for g, w in zip(got, want))
    return {
        "status": "ok" if same == len(prompts) else "fail",
        "identical_prompts": same,
        "prompts": len(prompts),
        "offloaded": len(range(0, len(prompts), 2)),
        "pool_sharing": "CUDA IPC" if args.device == "cuda" else "shared memory",
        "transport": transport,
        "offloaded_run_s": round(seconds, 2),
    }


def run_section(name: str, fn, results: dict) -> None:
    print(f"== {name}", flush=True)
    tic = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:
        results[name] = {
            "status": "error",
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc(),
        }
    results[name]["seconds"] = round(time.perf_counter() - tic, 1)
    print(
        json.dumps({k: v for k, v in results[name].items() if k != "trace"}, default=str)[:2000], flush=True
    )


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    lines = [
        f"# GPU check: {env['device']} (torch {env['torch']}, triton {env['triton']})",
        "",
        "| section | status | result | s |",
        "|---|---|---|---:|",
    ]
    for name, r in results.items():
        if name == "environment":
            continue
        shown = {k: v for k, v in r.items() if k not in ("status", "seconds", "trace", "rows", "log")}
        lines.append(
            f"| {name} | {r.get('status')} | {json.dumps(shown, default=str)[:300]} | {r.get('seconds')} |"
        )
    for name, r in results.items():
        if isinstance(r, dict) and r.get("rows"):
            cols = list(r["rows"][0])
            lines += ["", f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
            lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in r["rows"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    ap.add_argument("--model-path", default=os.environ.get("ADRENALINE_GPU_CHECK_MODEL"))
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--executor-sm-percent", type=int, default=None)
    ap.add_argument("--pytest-timeout", type=int, default=240)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.prompts = args.prompts or (8 if gpu else 3)
    args.new_tokens = args.new_tokens or (32 if gpu else 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the token comparison
    results: dict = {"environment": environment(device)}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    path, origin = resolve_model(args, workdir)
    results["environment"]["model"] = {"path": path, "origin": origin}
    peak = results["environment"]["peak_hbm_bytes_per_s"]
    sections = {
        "pytest_gpu": lambda: section_pytest(args),
        "tokens_vs_cpu_fp32": lambda: section_tokens(args, path),
        "executor_cuda_ipc": lambda: section_executor(args, path),
        "exchange_latency": lambda: exchange_latency(device, gpu),
        "offload_step_overhead": lambda: step_overhead(path, device, gpu),
        "decode_bandwidth": lambda: decode_bandwidth(device, gpu, peak),
    }
    for name, fn in sections.items():
        if name in args.skip:
            results[name] = {"status": "skipped", "reason": "--skip"}
            continue
        run_section(name, fn, results)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_markdown(results, out / "results.md")
    print((out / "results.md").read_text())
    return (
        0
        if all(r.get("status") in ("ok", "skipped") for k, r in results.items() if k != "environment")
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
