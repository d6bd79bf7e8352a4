"""Load-aware offload policy on synthetic profiles: each bound at its edge, local room first, no
overcommit, live load.

The synthetic curves are linear with power-of-two coefficients on power-of-two grids, so the
profile's interpolation is exact in floating point and each edge is computed here by hand.
"""

from __future__ import annotations

import random

import pytest

from adrenaline.core.profile import Curve, Grid, Profile
from adrenaline.offload import paper_bounds
from adrenaline.offload.ledger import ExecutorLedger
from adrenaline.offload.load_aware import Candidate, ExecutorLoad, LoadAwarePolicy, LoadView, Reason, Slo

LAYERS = 4


def local_ms(b: float, c: float) -> float:
    return b / 4 + c / 1024


def profile(executor_factor: float = 0.5) -> Profile:
    bs, cs = [0, 64], [0, 65536]
    grid = lambda f: Grid(bs, cs, [[f * local_ms(b, c) for c in cs] for b in bs])
    return Profile(
        model="synthetic", dtype="float32", device="cpu", machine="test", num_layers=LAYERS,
        executor_threads=1, prefill_threads=1,
        decode_dense=Curve([0, 256], [8, 72]),  # 8 + b/4 ms per step
        local_attention=grid(1.0),
        executor_attention=grid(executor_factor),
        executor_threads_scaling=Curve([1, 2], [2, 1]),
        exchange=Curve([0, 64], [0, 8]),  # rows/8 ms per layer
        prefill_interference=Curve([0, 1], [1000, 600]),
    )  # fmt: skip


def executor(name: str = "e0", **kw) -> ExecutorLoad:
    return ExecutorLoad(name=name, capacity_tokens=kw.pop("capacity_tokens", 1 << 20), **kw)


def view(*executors: ExecutorLoad, local_batch: int = 8, local_context: int = 4096) -> LoadView:
    return LoadView(local_batch, local_context, 0, list(executors) or [executor()])


def largest_prompt(policy: LoadAwarePolicy, v: LoadView, max_new: int = 0) -> int:
    """The largest prompt the policy offloads (decisions are monotone in prompt length)."""
    ok = lambda n: LoadAwarePolicy(policy.profile, policy.slo, policy.margin).decide(v, Candidate(n, max_new))
    return paper_bounds.largest_batch(lambda n: ok(n).reason is Reason.OK, limit=1 << 20)


def test_memory_refuses_exactly_past_the_room():
    ex = executor(capacity_tokens=1000, reserve_tokens=100, committed_tokens=500)
    pol = LoadAwarePolicy(profile())
    assert pol.decide(view(ex), Candidate(300, 101)).reason is Reason.MEMORY  # 401 > 400 left
    d = pol.decide(view(ex), Candidate(300, 100))
    assert (d.reason, d.executor) == (Reason.OK, "e0")
    # the executor has not reported it yet: still counted, so nothing more fits
    assert pol.decide(view(ex), Candidate(1, 0)).reason is Reason.MEMORY
    pol.release("e0", 400)
    assert pol.decide(view(ex), Candidate(1, 0)).reason is Reason.OK


def test_fair_share_refuses_beyond_an_equal_share():
    ex = executor(capacity_tokens=1000, reserve_tokens=100, clients=3)  # share 300 each
    pol = LoadAwarePolicy(profile())
    assert pol.decide(view(ex), Candidate(200, 101)).reason is Reason.FAIR_SHARE
    assert pol.decide(view(ex), Candidate(200, 100)).reason is Reason.OK
    assert pol.decide(view(ex), Candidate(1, 0)).reason is Reason.FAIR_SHARE


def test_step_budget_refuses_exactly_past_one_plus_margin():
    # alone: dense(8) + LAYERS * local(8, 4096) = 10 + 4 * 6 = 34 ms; budget 1.25 * 34 = 42.5 ms.
    # offloaded: dense(9) + LAYERS * max(6, remote), remote = 0.5 * local(1, L) + 1/8 = 1/4 + L/2048
    pol = LoadAwarePolicy(profile(), margin=0.25)
    assert largest_prompt(pol, view()) == (42.5 - 10.25 - 1) / 4 * 2048 == 16000
    assert pol.profile.step_ms(8, 4096, 1, 0.25 + 16000 / 2048) == 1.25 * pol.profile.step_ms(8, 4096)
    d = LoadAwarePolicy(profile(), margin=0.25).decide(view(), Candidate(16001, 0))
    assert (d.reason, d.executor) == (Reason.STEP_BUDGET, None)


def test_step_budget_counts_the_offloaded_rows_dense_work():
    # a hidden remote group (0.28 ms under 6): each offloaded row still adds 1/4 ms of dense work,
    # 8 + (8 + n + 1) / 4 + 24 <= 42.5 -> n <= 33 offloaded already
    small = Candidate(64, 0)
    assert LoadAwarePolicy(profile(), margin=0.25).decide(LoadView(8, 4096, 33, [executor()]), small).executor
    over = LoadAwarePolicy(profile(), margin=0.25).decide(LoadView(8, 4096, 34, [executor()]), small)
    assert over.reason is Reason.STEP_BUDGET


def test_offloads_where_the_remote_time_shows_but_the_step_stays_in_budget():
    # the CPU case: one short local request's attention (0.375 ms) is shorter than the remote group's
    # (0.5 ms), so the paper's C2 refuses; the step only grows from 9.75 to 10.5 ms, within 1.2x
    pol = LoadAwarePolicy(profile())
    d = pol.decide(view(local_batch=1, local_context=128), Candidate(512, 8))
    assert d.reason is Reason.OK and d.predicted_ms == 0.5 > pol.profile.local_attention_ms(1, 128)
    assert pol.decide(view(local_batch=1, local_context=128), Candidate(2048, 8)).reason is Reason.STEP_BUDGET


@pytest.mark.parametrize("local_batch", [1, 8, 256])
def test_nothing_offloaded_while_the_request_fits_locally(local_batch):
    pol = LoadAwarePolicy(profile())
    v = LoadView(local_batch, local_batch * 512, 0, [executor()], local_room=True)
    for prompt in (1, 64, 1024):
        d = pol.decide(v, Candidate(prompt, 64))
        assert (d.executor, d.reason) == (None, Reason.LOCAL_ROOM)
    assert not +pol.ours and pol.counters()["local_room"] == 3  # nothing committed
    v.local_room = False  # the same request, the decode instance full
    assert pol.decide(v, Candidate(64, 64)).executor == "e0"


def test_tpot_slo_refuses_exactly_past_the_slo():
    # hidden remote: step = dense(8 + 0 + 1) + LAYERS * local(8, 4096) = 8 + 9/4 + 4 * 6
    step = 8 + 9 / 4 + LAYERS * 6
    assert LoadAwarePolicy(profile(), Slo(tpot_ms=step)).decide(view(), Candidate(64, 8)).reason is Reason.OK
    tight = LoadAwarePolicy(profile(), Slo(tpot_ms=step - 2**-10))
    assert tight.decide(view(), Candidate(64, 8)).reason is Reason.TPOT_SLO


def test_prefill_protection_at_the_ttft_slo_and_on_a_rising_queue():
    pol = LoadAwarePolicy(profile(), Slo(ttft_ms=200))
    assert pol.decide(view(executor(ttft_ms=[150, 200])), Candidate(8, 8)).reason is Reason.OK
    assert (
        pol.decide(view(executor(ttft_ms=[150, 200.5])), Candidate(8, 8)).reason is Reason.PREFILL_PROTECTION
    )
    assert pol.decide(view(executor(prefill_queue=[1, 2, 2])), Candidate(8, 8)).reason is Reason.OK
    rising_queue = executor(prefill_queue=[0, 1, 2])
    assert pol.decide(view(rising_queue), Candidate(8, 8)).reason is Reason.PREFILL_PROTECTION
    rising_ttft = executor(ttft_ms=[10, 20, 30])  # under the SLO, but falling behind
    assert pol.decide(view(rising_ttft), Candidate(8, 8)).reason is Reason.PREFILL_PROTECTION


@pytest.mark.parametrize("local_batch", [1, 16, 64, 256])
def test_nothing_offloaded_when_the_executor_is_slower_than_local(local_batch):
    pol = LoadAwarePolicy(profile(executor_factor=1.25), margin=0.0)
    v = view(local_batch=local_batch, local_context=local_batch * 4096)
    for prompt in (1, 64, 1024, 8192):
        assert pol.decide(v, Candidate(prompt, 64)).reason is Reason.SLOWER_THAN_LOCAL
    assert pol.counters()["ok"] == 0 and pol.counters()["slower_than_local"] == 4


def test_speed_bound_refuses_exactly_past_the_local_speed():
    v = view(local_batch=256, local_context=1 << 20)  # a wide window: only the speed bound can refuse
    assert LoadAwarePolicy(profile(executor_factor=1.0)).decide(v, Candidate(64, 8)).reason is Reason.OK
    slower = LoadAwarePolicy(profile(executor_factor=1 + 2**-10)).decide(v, Candidate(64, 8))
    assert slower.reason is Reason.SLOWER_THAN_LOCAL


def test_executor_kv_never_overcommitted_by_two_decode_instances_with_stale_reports():
    rng = random.Random(0)
    room, names = 45_000, ("e0", "e1")
    live: dict[str, list[tuple[int, int]]] = {n: [] for n in names}  # executor -> (client, future tokens)
    policies = [LoadAwarePolicy(profile()), LoadAwarePolicy(profile())]
    reports: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    for step in range(600):
        if step % 7 == 0:  # executors report seldom: the views lag the decisions
            reports = {n: list(live[n]) for n in names}
        client = rng.randrange(2)
        exs = [
            executor(n, capacity_tokens=room + 5_000, reserve_tokens=5_000, clients=2,
                     committed_tokens=sum(t for _, t in reports[n]),
                     seen_ours_tokens=sum(t for c, t in reports[n] if c == client))
            for n in names
        ]  # fmt: skip
        cand = Candidate(rng.randrange(1, 3000), rng.randrange(1, 2000))
        d = policies[client].decide(view(*exs), cand)
        if d.executor:
            live[d.executor].append((client, cand.future_tokens))
        for n in names:
            assert sum(t for _, t in live[n]) <= room
        if rng.random() < 0.4:  # a request finishes
            n = rng.choice(names)
            if live[n]:
                c, t = live[n].pop(rng.randrange(len(live[n])))
                policies[c].release(n, t)
    counts = [p.counters() for p in policies]
    assert all(c["ok"] > 50 and c["memory"] + c["fair_share"] > 50 for c in counts), counts


def test_decision_follows_the_live_load():
    pol = LoadAwarePolicy(profile(), margin=0.25)  # budget 42.5 ms at view(): remote <= 8.0625 ms
    cand = Candidate(4096, 64)  # remote 1/4 + 2 = 2.25 ms on an idle executor
    idle, busy = executor("e0"), executor("e1", batch=8, context=4096)
    assert pol.decide(view(idle, busy), cand).executor == "e0"  # the least loaded
    assert pol.decide(view(executor("e0", batch=8, context=4096), executor("e1")), cand).executor == "e1"
    busy = executor("e0", batch=8, context=4096)  # 9 rows, 8192 tokens: 0.5 * (9/4 + 8) + 9/8 = 6.25 ms
    profiled = 0.5 * local_ms(1, 1024) + 1 / 8  # e0's group of one, as profiled
    pol.observe(view(executor("e0", batch=1, context=1024, measured_ms=1.2 * profiled)))
    assert pol.correction["e0"] == pytest.approx(1.2)
    assert pol.decide(view(busy), cand).reason is Reason.OK  # 7.5 ms
    pol.observe(view(executor("e0", batch=1, context=1024, measured_ms=1.9 * profiled)))
    assert pol.correction["e0"] == pytest.approx(1.2 + 0.3 * 0.7)  # the EWMA moves toward 1.9
    assert pol.decide(view(busy), cand).reason is Reason.STEP_BUDGET  # 8.81 ms
    assert pol.decide(view(busy, local_batch=64, local_context=65536), cand).reason is Reason.OK
    # the executor fills up: the same request no longer fits the budget
    fresh = LoadAwarePolicy(profile(), margin=0.25)
    assert fresh.decide(view(executor("e0", batch=32, context=32768)), cand).reason is Reason.STEP_BUDGET


def test_no_reachable_executor_keeps_local_and_counts():
    pol = LoadAwarePolicy(profile())
    d = pol.decide(view(executor(reachable=False)), Candidate(8, 8))
    assert (d.executor, d.reason) == (None, Reason.NO_EXECUTOR)
    assert pol.decide(LoadView(8, 4096, 0, []), Candidate(8, 8)).reason is Reason.NO_EXECUTOR
    assert pol.counters() == {r.value: 2 * (r is Reason.NO_EXECUTOR) for r in Reason}


def test_paper_bounds_on_the_synthetic_profile():
    p = profile()
    assert paper_bounds.ob_mem([30_000, 10_000], 50_000, [2.0], 4.0) == 0.5
    # B_TPOT at 1024 tokens each: 8 + b/4 + 4 * (b/4 + b) <= 58 -> b <= 9.52
    assert paper_bounds.b_tpot(p, 58, 1024) == 9
    assert paper_bounds.b_max(p, 58) == 200  # 8 + b/4 <= 58
    assert paper_bounds.ob_comp(200, 9) == pytest.approx(191 / 9)
    bw = paper_bounds.attention_bandwidth(p, 8, 8192, executor=True) / paper_bounds.attention_bandwidth(
        p, 8, 8192, executor=False
    )
    assert bw == 2.0  # the synthetic executor attends twice as fast
    assert paper_bounds.c2((8, 8192), (4, 4096), bw) and not paper_bounds.c2((9, 8192), (4, 4096), bw)
    assert paper_bounds.c1(1000, 2000, 0.5) and not paper_bounds.c1(1001, 2000, 0.5)


def test_executor_ledger_never_overcommits_and_agrees_with_fresh_decode_decisions():
    rng = random.Random(1)
    ledger = ExecutorLedger(capacity_tokens=40_000, reserve_tokens=4_000)
    clients = ["d0", "d1", "d2"]
    policies = {c: LoadAwarePolicy(profile()) for c in clients}
    live: list[tuple[str, int, int]] = []  # (client, request, tokens)
    for request in range(500):
        client = rng.choice(clients[: 1 + request // 100])  # decode instances join over time
        cand = Candidate(rng.randrange(1, 3000), rng.randrange(1, 2000))
        d = policies[client].decide(view(executor(**ledger.report(client))), cand)
        reason = ledger.admit(client, request, cand.future_tokens)
        assert reason is d.reason  # a fresh report: the decode side predicts the executor's answer
        if reason is Reason.OK:
            live.append((client, request, cand.future_tokens))
        assert ledger.committed == sum(t for _, _, t in live) <= 36_000
        if live and rng.random() < 0.45:
            c, r, t = live.pop(rng.randrange(len(live)))
            ledger.release(r)
            policies[c].release("e0", t)
    assert ledger.counts[Reason.OK] > 100 and ledger.counts[Reason.FAIR_SHARE] > 10, ledger.counts


def test_a_newcomer_gets_an_equal_share_of_the_ledger():
    ledger = ExecutorLedger(capacity_tokens=1000)
    assert ledger.admit("d0", 0, 900) is Reason.OK  # alone: the whole room
    assert ledger.admit("d1", 1, 101) is Reason.MEMORY
    assert ledger.admit("d1", 1, 100) is Reason.OK
    ledger.release(0)
    assert ledger.admit("d0", 2, 501) is Reason.FAIR_SHARE  # two now: 500 each
    assert ledger.admit("d0", 2, 500) is Reason.OK
    report = {"capacity_tokens": 1000, "reserve_tokens": 0, "committed_tokens": 600, "seen_ours_tokens": 100}
    assert ledger.report("d1") == {**report, "clients": 2}
