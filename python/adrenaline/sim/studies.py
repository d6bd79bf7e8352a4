"""The studies in docs/sim.md: the paper's setting and a scaling study, as tables and PNGs.

``python -m adrenaline.sim.studies --out docs/figures/sim`` (a few minutes on one core). Every
number comes from ``Setup.run`` with the default assumptions; nothing here is fitted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adrenaline.offload.load_aware import Slo
from adrenaline.sim.cluster import Deployment
from adrenaline.sim.cost import AnalyticCost
from adrenaline.sim.hardware import gpu
from adrenaline.sim.model import ModelSpec
from adrenaline.sim.report import plot_lines, table
from adrenaline.sim.run import Setup
from adrenaline.sim.workload import Spec, synthetic


def closed(setup: Setup) -> Setup:
    """Saturating closed loop: twice the running cap of all decode instances."""
    return setup.with_(concurrency=2 * setup.dep.max_running * setup.dep.decode)


def paper_setting(out: Path, n: int) -> str:
    """A100-80G, Llama-2-7B, 1P1D, ShareGPT-like: plain PD vs offloading."""
    cost = AnalyticCost(ModelSpec.load("llama-2-7b"), gpu("a100-80g"))
    base = closed(Setup(cost, Deployment()))
    specs = synthetic("sharegpt", n, None, seed=0)
    lines = ["### Saturated (closed loop, 512 clients)", ""]
    rows, plain = [], None
    load_aware = base.with_(offload=True, policy="load-aware", executor_share=0.34, slo=Slo(tpot_ms=100.0))
    green = base.with_(offload=True, sm_partition="green-context")
    for s in [base, base.with_(offload=True), green, base.with_(offload=True, max_running=512), load_aware]:
        _, summ = s.run(specs)
        plain = plain or summ
        label = s.label() + (f", max-running {s.dep.max_running}" if s.dep.max_running != 256 else "")
        label += ", green context" if s.dep.sm_partition != "mps" else ""
        rows.append((f"{label} ({summ.output_tok_s / plain.output_tok_s:.2f}x)", summ))
    lines += [table(rows), ""]
    # the same load for both: Poisson at 90 % of plain PD's saturated request rate
    rate = 0.9 * plain.request_s
    at = synthetic("sharegpt", n, rate, seed=0)
    _, p = base.run(at)
    _, o = base.with_(offload=True).run(at)
    lines += [f"### Same offered load (Poisson, {rate:.1f} req/s = 90 % of plain PD's saturated rate)", ""]
    lines += [table([("plain PD", p), ("PD + offload ratio 0.7", o)]), ""]
    lines += [
        f"prefill HBM capacity use {p.prefill_hbm_capacity_use:.0%} -> {o.prefill_hbm_capacity_use:.0%} "
        f"({o.prefill_hbm_capacity_use / p.prefill_hbm_capacity_use:.2f}x); bandwidth use "
        f"{p.prefill_hbm_bw_use:.0%} -> {o.prefill_hbm_bw_use:.0%} "
        f"({o.prefill_hbm_bw_use / p.prefill_hbm_bw_use:.2f}x)",
        "",
    ]
    ratios = [0.25, 0.5, 0.7, 1.0, 1.5, 2.0, 4.0]
    series = {}
    for cap in (256, 512):
        ys = [base.with_(offload=True, ratio=r, max_running=cap).run(specs)[1].output_tok_s for r in ratios]
        series[f"offload, max-running {cap}"] = (ratios, [y / plain.output_tok_s for y in ys])
    plot_lines(series, "A100-80G, Llama-2-7B, 1P1D: gain vs offload ratio", "static ratio N/M",
               "output throughput / plain PD", out / "paper_ratio.png")  # fmt: skip
    lines += ["gain vs static ratio: " + ", ".join(
        f"{k}: " + " ".join(f"{r:g}->{g:.2f}x" for r, g in zip(*v)) for k, v in series.items())]  # fmt: skip
    return "\n".join(lines)


def compare(setup: Setup, specs: list[Spec]) -> tuple[float, str]:
    """(offload / plain PD throughput, 'a -> b tok/s (g x)') for ``setup`` in a saturating loop."""
    _, a = closed(setup).run(specs)
    _, b = closed(setup.with_(offload=True)).run(specs)
    g = b.output_tok_s / a.output_tok_s
    return g, f"{a.output_tok_s:.0f} -> {b.output_tok_s:.0f} tok/s ({g:.2f}x)"


def scaling(out: Path, n: int) -> str:
    """H100: gain vs P:D split (8 instances) and vs prompt length (1P1D), for 7B and 70B."""
    lines = []
    models = {"llama-2-7b (tp 1)": ("llama-2-7b", 1), "llama-3-70b (tp 4)": ("llama-3-70b", 4)}
    split_series, ctx_series = {}, {}
    for name, (model, tp) in models.items():
        cost = AnalyticCost(ModelSpec.load(model), gpu("h100"), tp)
        base = Setup(cost, Deployment(), ratio=0.7)
        specs = synthetic("sharegpt", n, None, seed=0)
        for part in ("mps", "green-context"):
            xs, gains, rows = [], [], []
            for p in range(1, 8):
                g, text = compare(base.with_(prefill=p, decode=8 - p, sm_partition=part), specs)
                xs.append(p / (8 - p))
                gains.append(g)
                rows.append(f"{p}P{8 - p}D {text}")
            split_series[f"{name}, {part}"] = (xs, gains)
            lines += [f"- {name}, 8 instances, executor SMs by {part}: " + "; ".join(rows)]
        means, gains, rows = [], [], []
        for k in [0.5, 1, 2, 4, 8]:
            cs = synthetic("sharegpt", n, None, seed=0, context_scale=k)
            g, text = compare(base, cs)
            kept = [x.input_len for x in cs if x.input_len < cost.model.max_context]  # others rejected
            means.append(sum(kept) / len(kept))
            gains.append(g)
            rows.append(f"prompt mean {means[-1]:.0f} ({len(cs) - len(kept)} rejected): {text}")
        ctx_series[name] = (means, gains)
        lines += [f"- {name}, 1P1D, by prompt length: " + "; ".join(rows)]
    plot_lines(split_series, "H100, ShareGPT-like, 8 instances: gain vs P:D", "prefill : decode instances",
               "offload / plain PD throughput", out / "scaling_split.png")  # fmt: skip
    plot_lines(ctx_series, "H100, 1P1D: gain vs prompt length", "mean prompt tokens",
               "offload / plain PD throughput", out / "scaling_context.png")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/figures/sim")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--only", choices=["paper", "scaling"])
    args = ap.parse_args()
    out = Path(args.out)
    if args.only != "scaling":
        print("## Paper setting\n\n" + paper_setting(out, args.requests) + "\n", flush=True)
    if args.only != "paper":
        print("## Scaling (H100)\n\n" + scaling(out, args.requests), flush=True)


if __name__ == "__main__":
    main()
