"""``python -m adrenaline.sim.validate --profile P --run LOG``: predicted vs measured.

For every PD run in a benchmark's request log (``bench.pd`` / ``bench.offload --request-log``),
replay its requests on its deployment with the measured profile and print a markdown table of the
figures the planner is to predict within 15 % (issue 15): output throughput, TPOT p50 and the
decode instance's mean batch (requests per forward pass). Flags after ``--`` go to every
simulation (``python -m adrenaline.sim``'s, e.g. ``-- --model PATH``).
"""

from __future__ import annotations

import argparse
import sys

from adrenaline.core.run_log import read_runs
from adrenaline.sim import replay
from adrenaline.sim.cli import parse, setup_from
from adrenaline.sim.metrics import Summary

# (column, measured key, Summary field)
FIGURES = (
    ("output tok/s", "output_throughput", "output_tok_s"),
    ("TPOT p50 ms", "median_tpot_ms", "tpot_p50_ms"),
    ("mean decode batch", "mean_decode_batch", "mean_decode_batch"),
)


def comparable(key: str, measured: float) -> bool:
    """A TPOT p50 under a millisecond was not measured: the client got each request's tokens in
    one chunk (the router held the decode side's stream back), so it has no per-token time."""
    return not (key == "median_tpot_ms" and measured < 1.0)


def error(predicted: float, measured: float) -> float:
    """Signed relative error of the prediction, in %."""
    return (predicted - measured) / measured * 100 if measured else float("nan")


def rows(log: str, profile: str, extra: list[str]) -> list[tuple[str, dict, Summary]]:
    out = []
    for run in read_runs(log):
        if run.deployment["mode"] != "pd":
            continue
        args = parse(["--profile", profile, "--replay", log, "--run", run.run, *extra])
        _, summary = setup_from(args).run(replay.specs(run))
        out.append((run.run, run.measured, summary))
    return out


def table(results: list[tuple[str, dict, Summary]]) -> str:
    head = "| run | " + " | ".join(f"{c}: measured / predicted (error)" for c, _, _ in FIGURES) + " |"
    lines = [head, "|---|" + "---:|" * len(FIGURES)]
    for name, measured, s in results:
        cells = []
        for _, key, field in FIGURES:
            m, p = measured[key], getattr(s, field)
            judged = f"{error(p, m):+.0f} %" if comparable(key, m) else "n/a: tokens in one chunk"
            cells.append(f"{m:.1f} / {p:.1f} ({judged})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m adrenaline.sim.validate", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="python -m adrenaline.profile's JSON")
    ap.add_argument("--run", required=True, action="append", help="a bench request log (repeatable)")
    args = ap.parse_args(argv[:cut])
    results = [r for log in args.run for r in rows(log, args.profile, argv[cut + 1 :])]
    if not results:
        raise SystemExit("no PD run in the logs")
    print(table(results))
    worst = max(
        abs(error(getattr(s, f), m[k])) for _, m, s in results for _, k, f in FIGURES if comparable(k, m[k])
    )
    print(f"\nlargest error: {worst:.0f} % (target: within 15 %)")


if __name__ == "__main__":
    main()
