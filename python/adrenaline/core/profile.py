"""The offload profile: measured cost curves of one model+dtype on one machine, and their lookup.

Pure stdlib, so the load-aware policy and the capacity-planner simulator read it without torch.
``python -m adrenaline.profile`` writes it; ``load_profile(path)`` reads it back.

JSON layout (``version`` 1; times in milliseconds, throughputs in tokens per second)::

    {
      "version": 1,
      "model": "SmolLM2-135M", "dtype": "float32", "device": "cpu",
      "machine": "Intel(R) Xeon(R) ... x2",        # CPU model x usable cores (the cache key's part)
      "num_layers": 30,
      "executor_threads": 1, "prefill_threads": 1,  # the share the executor curves were timed at
      "decode_dense":       {"x": [batch...],  "y": [ms per decode step, all layers, no attention]},
      "local_attention":    {"batch": [...], "context": [...], "ms": [[...] per batch]},
      "executor_attention": {"batch": [...], "context": [...], "ms": [[...] per batch]},
      "executor_threads_scaling": {"x": [threads...], "y": [ms of one reference attention]},
      "exchange":           {"x": [rows...],   "y": [ms per layer round trip, one KV page per row]},
      "prefill_interference": {"x": [cores held by executor load], "y": [prefill tokens/s, rest]},
      "decode_overhead":    {"x": [batch...],  "y": [ms per decode step outside the forward]},
      "frontend_ms_per_token": 0.31,               # HTTP front end + detokenizer CPU per token
      "prefill_by_length":  {"x": [prompt tokens], "y": [prefill tokens/s, all cores]},
      "created": "2026-11-29T18:00:00Z"
    }

``local_attention`` (at all usable cores, as the decode side runs) and ``executor_attention`` (at
``executor_threads``) are per layer, on a (batch, total context) grid:
``context`` is the sum of the batch's KV lengths, ``ms[i][j]`` the time at ``batch[i]`` and
``context[j]``. A decode step of ``b`` local requests with total context ``c`` thus costs about
``decode_dense(b) + decode_overhead(b) + num_layers * local_attention(b, c)``.

``decode_dense`` is the model's forward alone; ``decode_overhead`` the scheduler's own work per
step around it (batch forming, sampling, finish checks, the streamed output sent on), which runs
in series with the forward. A profile written before that curve existed loads with it at zero
(the version stays 1): its steps are priced as before, without the overhead.

``prefill_by_length`` times one prompt at two lengths (the interference curve's and 4x it) on all
cores: the difference is the prompt's attention, which grows with its length, so a long prompt is
priced per token and per (token x context) pair (``prefill_ms``).

``frontend_ms_per_token`` is the CPU the server's other processes spend per streamed token (SGLang's
HTTP server and TokenizerManager, and its detokenizer), measured on a served stream. They run
beside the scheduler, so they cost a step nothing on a machine with cores to spare; the capacity
planner adds them to the decode step where they share the decode instance's cores (a CPU
deployment). 0 in a profile measured without it.

Times are the fastest of a few runs, made non-decreasing along each axis by the profiler (more
work never costs less; a noisy dip would mislead the policy). ``executor_threads_scaling`` and
``prefill_interference`` are stored as measured: the prefill runs on the cores the executor-like
load leaves (x = 0: all of them).

Lookups interpolate linearly and extrapolate the end segments linearly (never below zero), so a
load beyond the profiled range is priced at the trend of the measured points, not clamped.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSION = 1


def _lerp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) with linear extrapolation at both ends; xs ascending."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class Curve:
    """y as a function of one variable, measured at ascending x."""

    x: list[float]
    y: list[float]

    def __post_init__(self) -> None:
        if not self.x or len(self.x) != len(self.y):
            raise ValueError("a curve needs as many y as x, at least one")
        if any(a >= b for a, b in zip(self.x, self.x[1:])):
            raise ValueError(f"curve x must ascend strictly: {self.x}")

    def at(self, x: float) -> float:
        return _lerp(self.x, self.y, x)


@dataclass
class Grid:
    """Milliseconds as a function of (batch, total context), measured on a rectangular grid."""

    batch: list[float]
    context: list[float]
    ms: list[list[float]]  # ms[i][j] at batch[i], context[j]

    def __post_init__(self) -> None:
        Curve(self.batch, self.batch), Curve(self.context, self.context)  # both axes ascend
        if len(self.ms) != len(self.batch) or any(len(r) != len(self.context) for r in self.ms):
            raise ValueError("grid ms must be len(batch) rows of len(context) values")

    def at(self, batch: float, context: float) -> float:
        """Bilinear: along context in each row, then along batch."""
        if batch <= 0:
            return 0.0
        return _lerp(self.batch, [_lerp(self.context, row, context) for row in self.ms], batch)


@dataclass
class Profile:
    model: str
    dtype: str
    device: str
    machine: str
    num_layers: int
    executor_threads: int
    prefill_threads: int
    decode_dense: Curve
    local_attention: Grid
    executor_attention: Grid
    executor_threads_scaling: Curve
    exchange: Curve
    prefill_interference: Curve
    created: str = ""
    decode_overhead: Curve = field(default_factory=lambda: Curve([1], [0.0]))  # older profiles: none
    frontend_ms_per_token: float = 0.0  # older profiles, and ``--no-frontend``: not measured
    prefill_by_length: Curve = field(default_factory=lambda: Curve([1], [0.0]))  # older: not measured
    version: int = field(default=VERSION)

    # ---- the quantities the policy and the simulator ask for -----------------------------------
    def dense_ms(self, batch: int) -> float:
        """One decode forward's non-attention work (all layers and the logits)."""
        return self.decode_dense.at(batch) if batch > 0 else 0.0

    def overhead_ms(self, batch: int) -> float:
        """The scheduler's work per decode step outside the forward (sampling, output, ...)."""
        return self.decode_overhead.at(batch) if batch > 0 else 0.0

    def local_attention_ms(self, batch: int, context: int) -> float:
        """One layer's attention over ``batch`` local requests with ``context`` KV tokens in all."""
        return self.local_attention.at(batch, context)

    def executor_attention_ms(self, batch: int, context: int, threads: int | None = None) -> float:
        """One layer's attention on the executor; ``threads`` rescales from the profiled share."""
        ms = self.executor_attention.at(batch, context)
        if threads is None or threads == self.executor_threads or batch <= 0:
            return ms
        s = self.executor_threads_scaling
        return ms * s.at(threads) / s.at(self.executor_threads)

    def exchange_ms(self, rows: int) -> float:
        """One layer's q|k|v out and output back for ``rows`` offloaded requests (0 rows: nothing)."""
        return self.exchange.at(rows) if rows > 0 else 0.0

    def prefill_tokens_per_s(self, busy_executor_threads: float) -> float:
        return self.prefill_interference.at(busy_executor_threads)

    def prefill_ms(self, tokens: int, pairs: float, busy_executor_threads: float = 0) -> float:
        """Prefilling ``tokens`` new tokens whose (token x its mean context) sum to ``pairs``: a
        part per token and an attention part per pair, from the two prompt lengths measured, at
        the rate the interference curve gives with ``busy_executor_threads`` held away. Without
        those lengths (an older profile), every token at the measured prompt's rate."""
        rate = self.prefill_tokens_per_s(busy_executor_threads)
        lengths, rates = self.prefill_by_length.x, self.prefill_by_length.y
        if len(lengths) < 2 or min(rates) <= 0:
            return tokens / rate * 1e3
        (l1, l2), (r1, r2) = lengths[:2], rates[:2]
        per_pair = (1e3 / r2 - 1e3 / r1) / ((l2 - l1) / 2)  # ms; a prompt of L has L/2 mean context
        per_token = 1e3 / r1 - per_pair * l1 / 2
        return max(per_token * tokens + per_pair * pairs, 0.0) * r1 / rate

    def step_ms(
        self, local_batch: int, local_context: int, offloaded_batch: int = 0, remote_ms: float = 0.0
    ) -> float:
        """A decode step's time (what TPOT sees). ``remote_ms``: the offloaded group's executor
        attention plus exchange per layer; it overlaps the local attention, so a layer takes the
        longer of the two. The dense part and the step's overhead run for local and offloaded
        requests alike."""
        per_layer = max(self.local_attention_ms(local_batch, local_context), remote_ms)
        batch = local_batch + offloaded_batch
        return self.dense_ms(batch) + self.overhead_ms(batch) + self.num_layers * per_layer

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if d.get("version") != VERSION:
            raise ValueError(f"profile version {d.get('version')} is not {VERSION}; re-run the profiler")
        curves = {k: Curve(**d[k]) for k in _CURVES if k in d or k not in _ADDED}
        grids = {k: Grid(**d[k]) for k in _GRIDS}
        rest = {k: v for k, v in d.items() if k not in _CURVES and k not in _GRIDS}
        return cls(**rest, **curves, **grids)


_CURVES = (
    "decode_dense", "executor_threads_scaling", "exchange", "prefill_interference", "decode_overhead",
    "prefill_by_length",
)  # fmt: skip
# curves added within version 1: a profile without one takes its default
_ADDED = ("decode_overhead", "prefill_by_length")
_GRIDS = ("local_attention", "executor_attention")


def load_profile(path: str | Path) -> Profile:
    return Profile.from_dict(json.loads(Path(path).read_text()))


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
