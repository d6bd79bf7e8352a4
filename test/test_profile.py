"""The profiler end to end in quick mode on a tiny random-weight model: its JSON loads back, and
its curves are sane (positive, more work never cheaper, the plan's points all present)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest

from adrenaline.core.profile import load_profile
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
    assert p.local_attention.batch == plan.attn_batches and p.executor_attention.context == plan.contexts
    values = [
        *p.decode_dense.y, *p.exchange.y, *p.executor_threads_scaling.y, *p.prefill_interference.y,
        *(v for g in (p.local_attention, p.executor_attention) for row in g.ms for v in row),
    ]  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert p.dense_ms(4) >= p.dense_ms(1) and p.exchange_ms(4) >= p.exchange_ms(1)
    assert p.local_attention_ms(4, 256) >= p.local_attention_ms(1, 64)
    assert p.step_ms(4, 256) == p.dense_ms(4) + 3 * p.local_attention_ms(4, 256)
    pngs = sorted(f.name for f in tmp_path.glob("tiny.*.png"))
    if importlib.util.find_spec("matplotlib"):
        assert len(pngs) == 6 and "tiny.decode_dense.png" in pngs
    else:
        assert not pngs and "matplotlib is not installed" in proc.stdout
