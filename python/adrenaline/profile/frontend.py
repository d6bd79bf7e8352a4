"""The server's front-end CPU per streamed token: what a decode step's own curves leave out.

A served stream passes through more than the scheduler: SGLang's HTTP server and TokenizerManager
(the ``launch_server`` process) and its detokenizer handle every streamed token. On a CPU
deployment they share the decode instance's cores, so the capacity planner adds their CPU to the
step. Measured the only faithful way: a real single-instance server, streamed to by the
benchmarks' own client (SGLang's), with each process's CPU time read from the OS
(``bench.cpu_use``) and divided by the tokens streamed. CPU time, not wall time, so the
figure holds on a busy machine too.

It starts a server (~30 s here), so the cached profile a server measures at its first start
leaves it out; ``python -m adrenaline.profile`` measures it unless ``--no-frontend``.
"""

from __future__ import annotations

import argparse

from adrenaline.bench.serving import run_client, server
from adrenaline.procs import free_port

ROLES = ("single frontend", "single detokenizer")  # bench.cpu_use's names in a single instance


def frontend_ms_per_token(
    model_path: str, dtype: str, prompts: int = 32, output_len: int = 64, concurrency: int = 16
) -> float:
    """The HTTP front end's and detokenizer's CPU milliseconds per streamed token."""
    port = free_port()
    args = argparse.Namespace(
        num_prompts=prompts, input_len=32, output_len=output_len, max_concurrency=concurrency
    )
    with server(["--model-path", model_path, "--dtype", dtype], port):
        cpu = run_client(port, model_path, args)["cpu_ms_per_token"]
    missing = [r for r in ROLES if r not in cpu]
    if missing:
        raise RuntimeError(f"front-end processes not found: {missing} (seen: {sorted(cpu)})")
    return sum(cpu[r] for r in ROLES)
