"""Tables (plain text, Markdown-compatible) and PNG plots of simulation results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from adrenaline.sim.cluster import Cluster
from adrenaline.sim.metrics import Summary

COLUMNS = [
    ("output tok/s", "output_tok_s", "{:.0f}"),
    ("TTFT p50/p99 ms", ("ttft_p50_ms", "ttft_p99_ms"), "{:.0f} / {:.0f}"),
    ("TPOT p50/p99 ms", ("tpot_p50_ms", "tpot_p99_ms"), "{:.1f} / {:.1f}"),
    ("decode batch", "mean_decode_batch", "{:.1f}"),
    ("offloaded", "mean_offloaded", "{:.0%}"),
    ("remote exposed", "remote_exposed", "{:.0%}"),
    ("decode KV", "decode_kv_use", "{:.0%}"),
    ("executor KV", "executor_kv_use", "{:.0%}"),
    ("prefill HBM cap/bw", ("prefill_hbm_capacity_use", "prefill_hbm_bw_use"), "{:.0%} / {:.0%}"),
]


def _cell(s: Summary, key, fmt: str) -> str:
    values = [getattr(s, k) for k in (key if isinstance(key, tuple) else (key,))]
    return "-" if any(math.isnan(v) for v in values) else fmt.format(*values)  # nan: not modelled


def table(rows: Sequence[tuple[str, Summary]]) -> str:
    head = ["run"] + [c[0] for c in COLUMNS]
    body = [[label] + [_cell(s, k, f) for _, k, f in COLUMNS] for label, s in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def gain(base: Summary, new: Summary) -> str:
    g = new.output_tok_s / base.output_tok_s
    return f"gain: {g:.2f}x output throughput ({base.output_tok_s:.0f} -> {new.output_tok_s:.0f} tok/s)"


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("plots need matplotlib: pip install 'adrenaline[profile]' (or matplotlib)") from e
    return plt


def plot_runs(runs: Sequence[tuple[str, Cluster]], out_dir: str | Path) -> list[Path]:
    """Decode batch and KV use over time, and the TTFT/TPOT distributions, one line per run."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for label, c in runs:
        t = [s.time for s in c.samples]
        ax[0][0].plot(t, [sum(a + b for a, b in s.decode_batch) for s in c.samples], label=f"{label}: all")
        if any(b for s in c.samples for _, b in s.decode_batch):
            ax[0][0].plot(
                t, [sum(b for _, b in s.decode_batch) for s in c.samples], "--", label=f"{label}: offloaded"
            )
        ax[0][1].plot(t, [sum(s.decode_kv) for s in c.samples], label=f"{label}: decode KV")
        if any(any(s.executor_kv) for s in c.samples):
            ax[0][1].plot(t, [sum(s.executor_kv) for s in c.samples], "--", label=f"{label}: executor KV")
        done = [r for r in c.requests if r.finished is not None]
        ttft = sorted((r.first_token - r.arrival) for r in done)
        tpot = sorted((r.finished - r.first_token) * 1e3 / (r.generated - 1) for r in done if r.generated > 1)
        ax[1][0].plot(ttft, [i / len(ttft) for i in range(len(ttft))], label=label)
        ax[1][1].plot(tpot, [i / len(tpot) for i in range(len(tpot))], label=label)
    titles = [
        ("decode batch (all decode instances)", "time s", "requests"),
        ("KV in use", "time s", "tokens"),
        ("TTFT CDF", "s", "share"),
        ("TPOT CDF", "ms", "share"),
    ]
    for a, (title, x, y) in zip([*ax[0], *ax[1]], titles):
        a.set_title(title)
        a.set_xlabel(x)
        a.set_ylabel(y)
        a.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sim_runs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_lines(
    series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str, path: str | Path
) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
