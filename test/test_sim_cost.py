"""Cost models of the simulator against hand-computed expectations (sizes, rooflines, overlap)."""

from __future__ import annotations

import json

import pytest

from adrenaline.core.profile import Curve
from adrenaline.sim.cost import AnalyticCost, decode_step_time
from adrenaline.sim.hardware import Assumptions, gpu
from adrenaline.sim.model import ModelSpec
from adrenaline.sim.profiled import ProfileCost, profile_of

L7 = ModelSpec.load("llama-2-7b")


def test_model_sizes_match_the_published_ones(tmp_path):
    assert L7.kv_bytes_per_token == 512 * 1024  # 16 KiB per layer, fp16
    assert 6.7e9 < L7.weight_bytes / 2 < 6.8e9  # 6.74 B parameters
    assert ModelSpec.load("llama-3-8b").kv_bytes_per_token == 128 * 1024  # GQA, 8 KV heads
    assert 70.4e9 < ModelSpec.load("llama-3-70b").weight_bytes / 2 < 70.8e9
    # per offloaded row and layer: q, k, v out (24 KiB for 7B) and the output back (8 KiB)
    assert L7.exchange_bytes_per_row == 32 * 1024
    cfg = tmp_path / "m" / "config.json"
    cfg.parent.mkdir()
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    cfg.write_text(json.dumps({**sizes, "intermediate_size": 128, "vocab_size": 100}))
    m = ModelSpec.load(str(cfg.parent))
    assert (m.head_dim, m.kv_bytes_per_token) == (16, 2 * 2 * 2 * 16 * 2)


def test_decode_attention_time_is_kv_bytes_over_bandwidth():
    a = Assumptions()
    a100 = AnalyticCost(L7, gpu("a100-80g"), assume=a)
    extra = a100.attention_time(64, 200_000) - a100.attention_time(64, 100_000)
    assert extra == pytest.approx(100_000 * L7.kv_bytes_per_token / (2.039e12 * a.attn_bw_eff))
    h200 = AnalyticCost(L7, gpu("h200"), assume=a)
    assert a100.attention_time(64, 100_000) / h200.attention_time(64, 100_000) == pytest.approx(4.8 / 2.039)
    two = AnalyticCost(L7, gpu("a100-80g"), tp=2, assume=a)  # KV heads split over 2 GPUs
    assert two.attention_time(64, 100_000) == pytest.approx(a100.attention_time(64, 100_000) / 2)


def test_executor_bandwidth_rises_with_its_share_then_saturates():
    c = AnalyticCost(L7, gpu("a100-80g"))
    local = c.attention_time(32, 50_000)
    sat = c.a.exec_bw_saturation_share
    assert c.executor_time(32, 50_000, sat) == pytest.approx(local)
    assert c.executor_time(32, 50_000, 1.0) == pytest.approx(local)
    assert c.executor_time(32, 50_000, sat / 2) == pytest.approx(2 * local)


def test_dense_step_is_weight_bound_small_and_compute_bound_large():
    c = AnalyticCost(L7, gpu("a100-80g"))
    weights = L7.weight_bytes / (2.039e12 * c.a.weight_bw_eff) + c.a.step_overhead_s
    assert c.dense_time(1) == pytest.approx(weights)
    assert c.dense_time(8) == pytest.approx(weights)
    assert c.dense_time(2048) == pytest.approx(2 * c.dense_time(1024) - c.a.step_overhead_s)


def test_remote_attention_overlaps_local_attention():
    c = AnalyticCost(L7, gpu("a100-80g"))
    dense = c.dense_time(100)
    step, local, far = decode_step_time(c, 60, 60_000, [(40, 10_000, 1.0, 1)])
    assert far == pytest.approx(c.executor_time(40, 10_000, 1.0) + c.exchange_time(40)) and far < local
    assert step == pytest.approx(dense + local)  # hidden under the local attention
    step, local, far = decode_step_time(c, 60, 10_000, [(40, 60_000, 1.0, 1)])
    assert step == pytest.approx(dense + far) and far > local  # now on the critical path
    # an executor shared by two decode instances gives each half its bandwidth
    _, _, shared = decode_step_time(c, 60, 10_000, [(40, 60_000, 1.0, 2)])
    assert shared - c.exchange_time(40) == pytest.approx(2 * (far - c.exchange_time(40)))


def test_profile_backed_model_reproduces_the_tabulated_analytic_one():
    c = AnalyticCost(L7, gpu("h100"))
    p = ProfileCost(profile_of(c, share=0.2), L7, kv_tokens=1000)
    for rows, ctx in [(1, 1024), (48, 30_000), (200, 500_000)]:  # on and between grid points
        assert p.attention_time(rows, ctx) == pytest.approx(c.attention_time(rows, ctx), rel=1e-6)
        assert p.executor_time(rows, ctx, 0.2) == pytest.approx(c.executor_time(rows, ctx, 0.2), rel=1e-6)
    for rows in (1, 64, 256):
        assert p.dense_time(rows) == pytest.approx(c.dense_time(rows), rel=1e-6)
        assert p.exchange_time(rows) == pytest.approx(c.exchange_time(rows) - c.gpu.link_latency, rel=1e-6)
    assert p.kv_capacity_tokens() == 1000


def test_profile_cost_adds_the_measured_step_overhead_to_the_dense_part():
    prof = profile_of(AnalyticCost(L7, gpu("h100")), share=0.2)
    before = ProfileCost(prof, L7, kv_tokens=1000).dense_time(64)  # a profile without the curve
    prof.decode_overhead = Curve([1, 128], [0.2, 5.0])
    after = ProfileCost(prof, L7, kv_tokens=1000).dense_time(64)
    assert after - before == pytest.approx((0.2 + 4.8 * 63 / 127) / 1e3)
