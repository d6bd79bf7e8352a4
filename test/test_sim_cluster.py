"""End to end through the simulated cluster: every request finishes exactly once, all KV comes
back, and the runtime's offload policies decide on the simulated state as they would live."""

from __future__ import annotations

from collections import Counter

import pytest

from adrenaline.core.profile import save_profile
from adrenaline.offload.load_aware import LoadAwarePolicy, Slo
from adrenaline.offload.policy import StaticRatioPolicy
from adrenaline.sim.cli import main
from adrenaline.sim.cluster import Cluster, Deployment
from adrenaline.sim.cost import AnalyticCost
from adrenaline.sim.hardware import gpu
from adrenaline.sim.model import ModelSpec
from adrenaline.sim.policy import LoadAware, Static, counts_view
from adrenaline.sim.profiled import profile_of
from adrenaline.sim.workload import Spec, read_log, synthetic, write_log

COST = AnalyticCost(ModelSpec.load("llama-2-7b"), gpu("a100-80g"))


def run_checked(dep: Deployment, decider=None, specs=None):
    """Run, recording every finish, and check conservation."""
    specs = specs or synthetic("sharegpt", 300, rate=None, seed=1)
    cluster = Cluster(COST, dep, decider)
    finished = Counter()
    for d in cluster.decodes:
        d.on_finished = lambda r, inner=d.on_finished: (finished.update([r.rid]), inner(r))
    cluster.run(specs)
    assert len(cluster.requests) == len(specs)
    assert all(finished[r.rid] == 1 for r in cluster.requests)  # each exactly once
    assert all(r.generated == r.output_len <= r.spec.output_len for r in cluster.requests)
    assert all(r.arrival <= r.prefilled <= r.first_token <= r.finished for r in cluster.requests)
    for d in cluster.decodes:
        assert d.free == d.num_pages and not (d.pending or d.inflight or d.running or d.waiting)
    for p in cluster.prefills:
        assert p.free == p.num_pages and not (p.waiting or p.partial or p.held)
    for e in cluster.executors:
        assert e is None or (e.free == e.num_pages and e.committed == 0 and not e.clients)
    return cluster


def test_plain_pd_conserves_requests_and_kv():
    run_checked(Deployment(prefill=2, decode=3, concurrency=200))


def test_offload_conserves_and_tight_pools_retract_and_fall_back():
    # pools far too small for 96 concurrent long outputs: retractions and executor fallbacks happen
    dep = Deployment(
        decode_kv_tokens=6000, prefill_kv_tokens=6000, executor_kv_tokens=6000, offload=True, concurrency=96
    )
    specs = synthetic("long-output", 150, rate=None, seed=2)
    c = run_checked(dep, Static(1.0), specs)
    assert sum(d.retractions for d in c.decodes) > 0
    assert sum(d.fallbacks for d in c.decodes) > 0


def test_poisson_arrivals_and_replayed_log(tmp_path):
    specs = synthetic("long-prompt", 120, rate=5.0, seed=3)
    write_log(tmp_path / "log.jsonl", specs)
    replay = read_log(tmp_path / "log.jsonl")
    assert [(s.input_len, s.output_len) for s in replay] == [(s.input_len, s.output_len) for s in specs]
    c = run_checked(Deployment(prefill=1, decode=2, offload=True), Static(0.5), replay)
    assert min(r.arrival for r in c.requests) == 0.0


def test_static_policy_sees_the_runtime_counts():
    """Each decision gets (local, offloaded) counted as the runtime counts them: running or on
    their way, by where their attention runs, and decides as ``StaticRatioPolicy`` does."""
    seen = []

    class Recording(Static):
        def choose(self, dec, req, fits):
            reqs = [*dec.running, *dec.inflight.values()]
            counts = (sum(r.offload is None for r in reqs), sum(r.offload is not None for r in reqs))
            got = super().choose(dec, req, fits)
            seen.append((counts, dec.counts(), got))
            return got

    run_checked(Deployment(offload=True, concurrency=200), Recording(0.7))
    assert all(mine == theirs for mine, theirs, _ in seen)
    ref = StaticRatioPolicy(0.7)
    assert all(got == ref.decide(counts_view(*counts), None).offload for counts, _, got in seen)
    assert Counter(got for *_, got in seen).keys() == {True, False}


def test_load_aware_decisions_equal_the_runtime_policy_on_the_same_inputs():
    """Replaying the simulator's LoadViews (and releases) through a fresh ``LoadAwarePolicy`` gives
    the same decisions: the simulator adds no rule of its own (its local-room input is the runtime's
    admission check, ``DecodeInstance._fits``)."""
    log = []

    class Recording(LoadAware):
        def choose(self, dec, req, fits):
            got = super().choose(dec, req, fits)
            view, cand = self.last
            ex = view.executors[0]
            held = self.prefills[req.prefill].executor.reqs.values()
            assert ex.committed_tokens == sum(r.spec.input_len + r.spec.max_new_tokens for r in held)
            log.append(("decide", view, cand, got))
            return got

        def released(self, req, executor):
            log.append(("release", str(executor), req.spec.input_len + req.spec.max_new_tokens))
            super().released(req, executor)

    profile = profile_of(COST, 0.5)  # an executor as fast as the decode side's attention
    slo = Slo(tpot_ms=60.0)
    # KV-bound decode instances: some requests fit there (kept local), the rest may offload
    dep = Deployment(
        prefill=2, decode=2, offload=True, concurrency=300, executor_share=0.5, decode_kv_tokens=20000
    )
    decider = Recording(profile, slo, dep.decode)
    run_checked(dep, decider, synthetic("sharegpt", 400, None, seed=4))
    assert not +decider.policy.ours  # every commitment released: nothing offloaded at the end
    ref = LoadAwarePolicy(profile, slo)
    decisions = []
    for entry in log:
        if entry[0] == "release":
            ref.release(entry[1], entry[2])
        else:
            _, view, cand, got = entry
            decisions.append(got)
            assert (ref.decide(view, cand).executor is not None) == got
    assert True in decisions and False in decisions  # both answers were exercised
    room = [got for kind, view, _, got in (e for e in log if e[0] == "decide") if view.local_room]
    assert room and not any(room)  # whatever fits locally stays local


@pytest.mark.parametrize("extra", [[], ["--offload-policy", "load-aware", "--tpot-slo-ms", "80"]])
def test_cli_compare_offload_prints_the_gain(capsys, extra):
    main(["--model", "llama-2-7b", "--num-requests", "200", "--compare-offload", *extra])
    out = capsys.readouterr().out
    assert "plain PD" in out and "offload" in out
    line = [x for x in out.splitlines() if x.startswith("gain: ")][0]
    assert line.split()[1].endswith("x") and float(line.split()[1][:-1]) > 0


def test_cli_predicts_a_measured_run_from_a_profile_and_a_request_log(tmp_path, capsys):
    """The lead's validation command: a profile JSON + a bench request log -> the three figures."""
    save_profile(profile_of(COST, 0.5), tmp_path / "prof.json")
    write_log(tmp_path / "log.jsonl", synthetic("sharegpt", 60, rate=20.0, seed=5))
    args = [
        "--profile",
        str(tmp_path / "prof.json"),
        "--model",
        "llama-2-7b",
        "--replay",
        str(tmp_path / "log.jsonl"),
    ]
    main([*args, "--decode-kv-tokens", "20000", "--offload", "--offload-ratio", "1"])
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("predicted: ")][0]
    assert "output tok/s" in line and "TPOT p50" in line and "mean decode batch" in line


def test_a_partitioned_executor_slows_prefill_more_than_an_mps_capped_one():
    """Under MPS the prefill loses the executor's share only while the executor runs; with green
    contexts it loses it whenever offloaded work exists (a prefill-bound layout shows it)."""
    specs = synthetic("long-prompt", 200, rate=None, seed=6)
    busy = {}
    for part in ("mps", "green-context"):
        dep = Deployment(prefill=1, decode=3, offload=True, concurrency=300, sm_partition=part)
        c = run_checked(dep, Static(1.0), specs)
        busy[part] = c.prefills[0].busy_time
    assert busy["mps"] < busy["green-context"]


def test_requests_end_at_the_runtimes_max_seq_len():
    """As the runtime: a prompt of max_seq_len (min of context length and decode pool) or more is
    rejected, and generation stops when prompt + output reach it."""
    dep = Deployment(decode_kv_tokens=2048, concurrency=4)  # Llama-2's context is 4096
    cluster = run_checked(dep, specs=[Spec(None, 2000, 100, 100), Spec(None, 10, 20, 20)])
    assert [r.generated for r in cluster.requests] == [48, 20]
    cluster = Cluster(COST, dep)
    cluster.run([Spec(None, 2048, 5, 5), Spec(None, 2047, 5, 5)])
    assert len(cluster.rejected) == 1 and [r.generated for r in cluster.requests] == [1]
