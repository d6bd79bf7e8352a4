"""PNG plots of a profile's curves, one file per curve, beside the JSON.

matplotlib is optional (``pip install adrenaline[profile]``): without it the profile is still
written and ``write_plots`` says how to get the pictures.
"""

from __future__ import annotations

from pathlib import Path

from adrenaline.core.profile import Curve, Grid, Profile

CURVES = {
    "decode_dense": ("decode batch", "ms per step (dense, all layers)"),
    "exchange": ("offloaded rows", "ms per layer (round trip)"),
    "executor_threads_scaling": ("executor threads", "ms (reference attention)"),
    "prefill_interference": ("cores held by executor load", "prefill tokens/s"),
    "decode_overhead": ("decode batch", "ms per step (scheduler, outside the forward)"),
}
GRIDS = ("local_attention", "executor_attention")


def write_plots(profile: Profile, stem: Path) -> list[Path]:
    """``<stem>.<curve>.png`` for each curve; [] (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'adrenaline[profile]')")
        return []
    paths = []
    for name in (*CURVES, *GRIDS):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        data = getattr(profile, name)
        if isinstance(data, Curve):
            ax.plot(data.x, data.y, marker="o")
            ax.set_xlabel(CURVES[name][0])
            ax.set_ylabel(CURVES[name][1])
        else:
            _plot_grid(ax, data)
        ax.set_title(f"{name} ({profile.model}, {profile.dtype})", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}.{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_grid(ax, grid: Grid) -> None:
    for b, row in zip(grid.batch, grid.ms):
        ax.plot(grid.context, row, marker="o", label=f"batch {b:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("total context (KV tokens)")
    ax.set_ylabel("ms per layer")
    ax.legend(fontsize=7)
