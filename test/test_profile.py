"""The profiler end to end in quick mode on a tiny random-weight model: its JSON loads back, and
its curves are sane (positive, more work never cheaper, the plan's points all present)."""

from __future__ import annotations

import importlib.util
import math
import pickle
import subprocess
import sys

import pytest
from sglang.srt.managers import io_struct as io

from adrenaline.core.profile import Curve, Profile, load_profile
from adrenaline.model_config import ModelConfig
from adrenaline.profile.frontend import frontend_ms_per_token
from adrenaline.profile.overhead import OverheadRig
from adrenaline.profile.run import Plan, rising_grid


def test_rising_grid_is_a_running_max_along_both_axes():
    assert rising_grid([[1, 3, 2], [0, 1, 5]]) == [[1, 3, 3], [1, 3, 5]]


@pytest.mark.slow
def test_quick_profile_of_a_tiny_model(tiny_model_factory, tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "adrenaline.profile", "--quick", "--model-path", tiny_model_factory("llama")]
    proc = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = load_profile(out)
    plan = Plan.of(quick=True)
    assert (p.num_layers, p.dtype, p.device, p.executor_threads) == (3, "float32", "cpu", 1)
    assert p.decode_dense.x == plan.dense_batches and p.exchange.x == plan.exchange_rows
    assert p.decode_overhead.x == plan.dense_batches
    assert p.prefill_by_length.x == [plan.prefill_tokens, 4 * plan.prefill_tokens]
    assert p.prefill_by_length.y[0] == p.prefill_interference.y[0] and p.prefill_by_length.y[1] > 0
    assert p.local_attention.batch == plan.attn_batches and p.executor_attention.context == plan.contexts
    values = [
        *p.decode_dense.y, *p.exchange.y, *p.executor_threads_scaling.y, *p.prefill_interference.y,
        *p.decode_overhead.y,
        *(v for g in (p.local_attention, p.executor_attention) for row in g.ms for v in row),
    ]  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert p.dense_ms(4) >= p.dense_ms(1) and p.exchange_ms(4) >= p.exchange_ms(1)
    assert p.local_attention_ms(4, 256) >= p.local_attention_ms(1, 64)
    assert p.overhead_ms(4) >= p.overhead_ms(1)
    assert p.step_ms(4, 256) == p.dense_ms(4) + p.overhead_ms(4) + 3 * p.local_attention_ms(4, 256)
    pngs = sorted(f.name for f in tmp_path.glob("tiny.*.png"))
    if importlib.util.find_spec("matplotlib"):
        assert len(pngs) == 7 and "tiny.decode_overhead.png" in pngs
    else:
        assert not pngs and "matplotlib is not installed" in proc.stdout


CURVE, GRID = {"x": [1, 8], "y": [2.0, 3.0]}, {"batch": [1, 8], "context": [16, 256], "ms": [[1, 2], [3, 4]]}
OLD = {
    "version": 1,
    "model": "m",
    "dtype": "float32",
    "device": "cpu",
    "machine": "x",
    "num_layers": 2,
    "executor_threads": 1,
    "prefill_threads": 1,
    "decode_dense": CURVE,
    "local_attention": GRID,
    "executor_attention": GRID,
    "executor_threads_scaling": CURVE,
    "exchange": CURVE,
    "prefill_interference": CURVE,
    "created": "",
}  # fmt: skip  (a profile as written before decode_overhead, front end and prompt lengths)


def test_a_profile_without_the_overhead_curve_loads_and_prices_steps_as_before(tmp_path):
    """Profiles written before ``decode_overhead`` existed keep their version and their step prices."""
    p = Profile.from_dict(OLD)
    assert p.overhead_ms(8) == 0.0 and p.step_ms(8, 256) == 3.0 + 2 * 4
    assert p.frontend_ms_per_token == 0.0  # not measured then
    assert p.prefill_ms(500, 500 * 250) == 500 / p.prefill_tokens_per_s(0) * 1e3  # one rate for all
    p.decode_overhead = Curve([1, 8], [0.5, 1.5])
    assert p.step_ms(8, 256) == 3.0 + 1.5 + 2 * 4
    again = tmp_path / "p.json"
    again.write_text(p.to_json())
    assert load_profile(again).decode_overhead == p.decode_overhead


def test_overhead_rig_runs_decode_steps_of_the_asked_batch(tiny_model_factory):
    """A timed step decodes every request once and streams all of them in one message."""
    rig = OverheadRig(ModelConfig.from_pretrained(tiny_model_factory("llama")), max_batch=8)
    try:
        assert rig.step_ms(8, reps=3, threads=1) > 0
    finally:
        rig.close()
    assert io._USE_PICKLE_IPC  # SGLang 0.5.23's wire format (SGLANG_FRONTEND_CONTRACT.md)
    msg = pickle.loads(rig.last)
    assert len(msg.rids) == 8 and [len(ids) for ids in msg.output_ids] == [1] * 8
    assert msg.finished_reasons == [None] * 8  # none ends while timed


def test_a_served_streams_front_end_is_charged_per_token(default_model):
    """A real server streams to SGLang's client; its HTTP front end and detokenizer are found by
    the titles they run under and their CPU is divided by the tokens streamed: some work per
    token, and less than a whole token's decode step here (~30 ms)."""
    ms = frontend_ms_per_token(default_model, "float32", prompts=8, output_len=16, concurrency=8)
    assert 0 < ms < 30


def test_a_long_prompt_is_priced_per_token_and_per_pair_from_the_two_lengths_measured():
    """Measured: 256-token prompts at 1000 tokens/s, 1024-token ones at 800 (their attention grows
    with the length). The two measured prompts come out at their own rates, a 640-token one in
    between (linear in its mean context), and held-away cores scale all of it."""
    p = Profile.from_dict(OLD)
    p.prefill_interference = Curve([0, 1], [1000.0, 500.0])
    p.prefill_by_length = Curve([256, 1024], [1000.0, 800.0])

    def ms(n: int, held: int = 0) -> float:
        return p.prefill_ms(n, n * n / 2, held)

    assert math.isclose(ms(256), 256.0) and math.isclose(ms(1024), 1280.0)
    assert math.isclose(ms(640) / 640, (1.0 + 1.25) / 2)
    assert math.isclose(ms(1024, held=1), 2560.0)
