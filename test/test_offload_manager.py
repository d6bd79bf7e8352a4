"""The decode side's ``OffloadManager`` with the load-aware policy, over a fake exchange (no servers):
it offloads when the synthetic profile says it pays, keeps requests local when they fit here or the
executor is slower or full or its prefill instance falls behind (as its load reports say), backs
off a prefill instance that refused a probe, corrects its predictions from measured exchange
waits, and every way out (finish, abort, retraction, refusal) returns the committed executor room
to zero. The synthetic profile is test_load_aware's (exact arithmetic)."""

from __future__ import annotations

import argparse

import pytest
from test_load_aware import profile

from adrenaline.core.request import Bootstrap, Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.offload.exchange import AttentionExchange
from adrenaline.offload.load_aware import Slo
from adrenaline.offload.load_aware_offload import LoadAwareOffload
from adrenaline.offload.manager import OffloadManager
from adrenaline.offload.protocol import LoadReport
from adrenaline.scheduler.placement import LocalLoad
from adrenaline.server.args import AdrenalineArgs

PS = 16
EXECUTOR = "tcp://executor-a"
LOCAL = LocalLoad(requests=8, free_pages=100, page_size=PS, context=4096)


class FakeExchange(AttentionExchange):
    """Only what the manager reads outside a step: the executors' KV reports."""

    def begin(self, step, groups, frees) -> None: ...
    def submit(self, step, layer, groups, qkv) -> None: ...
    def wait(self, step, layer, group, timeout_s): ...
    def free(self, executor, rooms) -> None: ...
    def close(self) -> None: ...


def manager(executor_factor: float = 0.5) -> OffloadManager:
    return OffloadManager(LoadAwareOffload(profile(executor_factor)), FakeExchange(), timeout_s=1)


def req(i: int, prompt: int = 100, max_new: int = 28, port: int = 8998) -> Req:
    return Req(
        f"r{i}", [0] * prompt, SamplingParams(max_new_tokens=max_new), bootstrap=Bootstrap("h", port, i)
    )


def committed(m: OffloadManager) -> int:
    return sum(m.policy.policy.ours.values())


def test_offloads_when_it_pays_until_the_executor_is_full_and_releases_to_zero():
    m = manager()
    first = req(0)
    assert m.place(first, LOCAL)  # a probe: the executor has not reported yet
    assert not m.place(req(1), LOCAL)  # one probe at a time
    # its prefill instance reports with the KV: the executor's ledger holds 320 tokens, 128 ours
    m.prefill_load(first, LoadReport([], [], 320, 0, 128, 128, 1, requests=1, context_tokens=100))
    m.attach(first, EXECUTOR)
    placed = [r for r in (req(i) for i in range(2, 6)) if m.place(r, LOCAL)]
    # 320 - 128 committed = 192 free: one more fits (128 each), counted until the next report
    assert [r.rid for r in placed] == ["r2"]
    assert m.last_reason.startswith("memory")
    assert m.info()["decisions"] == {**dict.fromkeys(m.info()["decisions"], 0), "ok": 2, "memory": 4}
    assert committed(m) == 2 * 128
    m.release(first)  # finished
    m.release(placed[0])  # aborted or retracted: the scheduler releases it the same way
    assert committed(m) == 0 and not m.homes


def test_slower_executor_keeps_everything_local():
    m = manager(executor_factor=2.0)
    assert not any(m.place(req(i), LOCAL) for i in range(4))
    assert m.info()["decisions"]["slower_than_local"] == 4 and committed(m) == 0


def test_a_request_the_scheduler_would_admit_locally_stays_local():
    m = manager()
    assert not m.place(req(0), LocalLoad(8, 100, PS, 4096, fits=True))
    assert m.last_reason == "local_room" and committed(m) == 0
    assert m.place(req(1), LOCAL)  # the decode instance full: offloaded (the probe was not spent)


def test_a_refused_probe_backs_off_that_prefill_instance_only():
    m = manager()
    r = req(0)
    assert m.place(r, LOCAL)
    m.release(r)  # requeue_local releases, then the executor's refusal is reported
    m.keep_local(r)
    assert committed(m) == 0 and m.stats.refused == 1
    assert not m.place(r, LOCAL)  # refused once: this request stays local
    assert not m.place(req(1), LOCAL) and m.last_reason.startswith("no_executor")
    assert m.place(req(2, port=9000), LOCAL)  # another prefill instance is still tried


def test_measured_waits_correct_the_prediction():
    m = manager()
    r = req(0)
    assert m.place(r, LOCAL)
    m.prefill_load(r, LoadReport([], [], capacity_tokens=16_000, committed_tokens=128, seen_ours_tokens=128))
    m.attach(r, EXECUTOR)
    m.tick()  # no offloaded step yet: nothing measured
    assert m.policy.policy.correction == {}
    # a step blocked 4 layers x 40 ms on the executor: far slower than its profile says
    m.client.step, m.client.wait_s = 1, 0.16
    m.tick()
    assert m.policy.policy.correction["h:8998"] > 10
    assert not m.place(req(1), LOCAL) and m.last_reason.startswith("slower_than_local")


def test_prefill_protection_follows_the_prefill_instances_reports():
    m = manager()
    room = dict(capacity_tokens=16_000)
    first = req(0)
    m.prefill_load(first, LoadReport([0, 1, 2], [40.0, 40.0], **room))  # its queue is growing
    assert not m.place(first, LOCAL) and m.last_reason.startswith("prefill_protection")
    m.prefill_load(first, LoadReport([0, 1, 2, 2], [40.0, 40.0], **room))  # no longer
    assert m.place(req(1), LOCAL)
    m.prefill_load(first, LoadReport([2, 2], [40.0, 50.0, 60.0], **room))  # TTFT rising
    assert not m.place(req(2), LOCAL) and m.last_reason.startswith("prefill_protection")
    slo = OffloadManager(LoadAwareOffload(profile(), Slo(ttft_ms=50)), FakeExchange(), timeout_s=1)
    slo.prefill_load(first, LoadReport([1, 1], [60.0, 50.5], **room))  # falling, but above the SLO
    assert not slo.place(req(3), LOCAL) and slo.last_reason.startswith("prefill_protection")
    slo.prefill_load(first, LoadReport([1, 1], [60.0, 50.0], **room))  # at it
    assert slo.place(req(4), LOCAL)
    assert m.info()["decisions"]["prefill_protection"] == 2


def test_each_prefill_instance_is_priced_by_its_own_reports():
    m = manager()
    room = dict(capacity_tokens=16_000)
    m.prefill_load(req(0, port=8998), LoadReport([0, 1, 2], [], **room))  # falling behind
    m.prefill_load(req(0, port=9000), LoadReport([2, 1, 0], [], **room))
    assert not m.place(req(1, port=8998), LOCAL) and m.last_reason.startswith("prefill_protection")
    assert m.place(req(2, port=9000), LOCAL)


def test_no_executor_at_that_prefill_instance_keeps_local():
    m = manager()
    m.prefill_load(req(0), LoadReport([], []))  # capacity 0: none there, or it is down
    assert not m.place(req(1), LOCAL) and m.last_reason.startswith("no_executor")


def parse(*argv: str) -> AdrenalineArgs:
    ap = argparse.ArgumentParser()
    AdrenalineArgs.add_cli_args(ap)
    return AdrenalineArgs.from_cli_args(ap.parse_args(list(argv)))


def test_policy_flags():
    assert parse().attention_offload_policy == "load-aware"
    assert parse("--attention-offload-ratio", "0.5").attention_offload_policy == "static"
    a = parse("--offload-profile", "p.json", "--tpot-slo-ms", "50")
    assert (a.offload_profile, a.tpot_slo_ms) == ("p.json", 50)
    with pytest.raises(ValueError):
        parse("--attention-offload-policy", "load-aware", "--attention-offload-ratio", "1")
    with pytest.raises(ValueError):
        parse("--ttft-slo-ms", "0")
    assert parse().offload_step_margin == 0.2 and parse("--offload-step-margin", "0").offload_step_margin == 0
    for bad in ("-0.1", "nan"):
        with pytest.raises(ValueError):
            parse("--offload-step-margin", bad)
    assert parse("--executor-cores", "auto").executor_cores == "auto"
    assert parse("--executor-cores", "2").executor_cores == "2" and parse().executor_cores is None
    for bad in ("0", "-1", "x"):
        with pytest.raises(ValueError):
            parse("--executor-cores", bad)
