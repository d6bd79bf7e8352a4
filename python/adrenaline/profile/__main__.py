"""Measure this machine's offload profile for a model and dtype; write JSON and PNG plots.

    python -m adrenaline.profile [--model-path P] [--dtype float32] [--output F.json] [--quick]
                                 [--no-frontend]

Without ``--output`` the profile goes to the cache the server reads at start
(``~/.cache/adrenaline/profiles/<model>-<dtype>-<machine>.json``, see ``offload.profile_source``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adrenaline.core.profile import save_profile
from adrenaline.models.default_model import resolve_model_path
from adrenaline.offload.profile_source import default_profile_path
from adrenaline.profile.plots import write_plots
from adrenaline.profile.run import run_profile


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--output", default=None, help="profile JSON path (default: the per-machine cache)")
    ap.add_argument("--executor-threads", type=int, default=1, help="the executor's share the curves price")
    ap.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="the decode instance's threads (default: all cores here; 1 for a decode pinned to one core)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="two points per axis, no front end (seconds, for tests)"
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--no-frontend",
        action="store_true",
        help="skip the served stream's front-end CPU (it starts a server, ~30 s; the planner's input)",
    )
    args = ap.parse_args(argv)
    model_path = resolve_model_path(args.model_path)
    profile = run_profile(
        model_path,
        args.dtype,
        args.executor_threads,
        args.quick,
        args.decode_threads,
        not (args.no_frontend or args.quick),
    )
    out = (
        Path(args.output) if args.output else default_profile_path(model_path, profile.dtype, profile.device)
    )
    save_profile(profile, out)
    print(f"profile written to {out}")
    if not args.no_plots:
        for png in write_plots(profile, out.with_suffix("")):
            print(f"plot: {png}")
    return out


if __name__ == "__main__":
    main()
