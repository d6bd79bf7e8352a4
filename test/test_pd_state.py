"""The PD and offload state machines without servers: a prefill and a decode instance (and an
attention executor) in one process over an in-memory network, on a tiny random model. Tokens
match the offline Engine; after every scenario each pool, the executor and the PD tables are
empty again."""

from __future__ import annotations

import msgspec
import pytest
from conftest import random_prompts
from pd_cluster import ENGINE_ARGS, PAGE, Cluster, params

from adrenaline import Engine
from adrenaline.disaggregation import decode as decode_module
from adrenaline.disaggregation.protocol import PD_VERSION
from adrenaline.offload import supervisor as supervisor_module
from adrenaline.offload.supervisor import ExecutorSupervisor
from adrenaline.transport.base import TransportError
from adrenaline.transport.mooncake_engine import mooncake_missing

N = 12  # tokens generated per request
MISSING = mooncake_missing()


def mooncake(**kw) -> pytest.param:
    """A cluster whose KV pages travel over Mooncake (loopback TCP); skipped without it."""
    why = f"Mooncake not installed: {MISSING}"
    return pytest.param(
        {"kv_plane": "mooncake", **kw}, marks=pytest.mark.skipif(MISSING is not None, reason=why)
    )


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def want(model):
    """The offline Engine's greedy tokens for ``prompts``."""
    engine = Engine(model, **ENGINE_ARGS)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        outs = engine.generate(input_ids=prompts, sampling_params=[params(N)] * len(prompts))
        return [o["output_ids"] for o in outs]

    return generate


@pytest.fixture
def cluster(model, request):
    c = Cluster(model, **getattr(request, "param", {}))
    yield c
    c.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return random_prompts(n, 512, [5, 17, 30, 9], seed=seed)


def finished(*reqs) -> bool:
    return all(r.finished for r in reqs)


def message(req) -> str:
    return req.finished_reason.get("message", "")


@pytest.mark.parametrize(
    "cluster",
    [
        {},
        *({"offload_ratio": r, "exchange": x} for r in (1.0, float("inf")) for x in ("tcp", "shm")),
        mooncake(),
        mooncake(offload_ratio=1.0, exchange="mooncake"),
    ],
    indirect=True,
)
def test_tokens_match_the_engine(cluster, want):
    ids = prompts(4)
    reqs = [cluster.add(f"r{i}", x, N, room=i)[1] for i, x in enumerate(ids)]
    cluster.run(lambda: finished(*reqs))
    assert [r.output_ids for r in reqs] == want(ids)
    assert all(r.finished_reason["type"] == "length" for r in reqs)
    offloaded = [bool(r.extra.get("attention_offloaded")) for r in reqs]
    assert any(offloaded) == (cluster.executor is not None)
    if cluster.executor is not None:  # the data path asked for
        exchange = cluster.d_sched.placement.client.exchange
        channels = getattr(exchange, "channels", getattr(exchange, "links", None))
        assert channels is None or list(channels) == [cluster.executor.transport.address]
        assert cluster.d_sched.placement.stats.fallbacks == 0  # every layer answered by the executor
    if cluster.movers[0] is not None:  # one-sided: every local request's pages, no KVPages message
        assert cluster.movers[0].plane.stats.pages == cluster.decode.stats.pages > 0
        assert cluster.prefill.transport.stats.bytes_sent == 0
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"offload_ratio": float("inf")}], indirect=True)
def test_every_first_token_brings_the_prefill_load(cluster):
    """Each KVDone carries the prefill instance's LoadReport; an offloaded request's shows its own
    future KV committed in the executor's ledger, for this decode instance."""
    heard = {}
    cluster.decode.loads = lambda req, report: heard.setdefault(req.rid, report)
    ids = prompts(4)
    reqs = [cluster.add(f"r{i}", x, N, room=i)[1] for i, x in enumerate(ids)]
    cluster.run(lambda: finished(*reqs))
    assert sorted(heard) == [r.rid for r in reqs]
    for req in reqs:
        r = heard[req.rid]
        assert (r.capacity_tokens, r.clients) == (128 * PAGE, 1)
        assert len(req.input_ids) + N <= r.seen_ours_tokens == r.committed_tokens <= r.capacity_tokens
    cluster.assert_clean()


def test_early_and_duplicate_messages(cluster, want):
    """The decode side asks before the prefill side has the request; every message arrives twice."""
    cluster.net.duplicate_kinds = {"KVRequest", "KVPages", "KVDone", "KVAck", "KVAlive"}
    ids = prompts(2, seed=1)
    reqs = [cluster.add(f"r{i}", x, N, room=i, side="decode")[1] for i, x in enumerate(ids)]
    for _ in range(3):
        cluster.iterate()
    assert set(cluster.prefill.early) == {0, 1}
    for i, x in enumerate(ids):
        cluster.add(f"r{i}", x, N, room=i, side="prefill")
    cluster.run(lambda: finished(*reqs))
    assert [r.output_ids for r in reqs] == want(ids)
    assert cluster.decode.stats.transfers == 2 and cluster.prefill.stats.transfers == 2
    cluster.assert_clean()


def test_layout_mismatch_fails_both_sides(cluster):
    cluster.decode.layout = msgspec.structs.replace(cluster.decode.layout, dtype="float16")
    p, d = cluster.add("r", prompts(1)[0], N, room=3)
    cluster.run(lambda: finished(p, d))
    assert "KV layout mismatch" in message(d) and "KV layout mismatch" in message(p)
    cluster.assert_clean()


def test_protocol_version_mismatch_names_both_versions(cluster, monkeypatch):
    monkeypatch.setattr(decode_module, "PD_VERSION", PD_VERSION + 1)
    p, d = cluster.add("r", prompts(1)[0], N, room=3)
    cluster.run(lambda: finished(p, d))
    for req in (p, d):
        assert f"speaks version {PD_VERSION}," in message(
            req
        ) and f"speaks version {PD_VERSION + 1}" in message(req)
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"offload_ratio": float("inf"), "executor_pages": 4}], indirect=True)
def test_executor_full_runs_here(cluster, want):
    ids = [prompts(1, seed=2)[0] + list(range(40, 60))]  # 6+ pages: more than the executor has
    d = cluster.add("r", ids[0], N, room=5)[1]
    cluster.run(lambda: finished(d))
    assert d.output_ids == want(ids)[0] and not d.extra.get("attention_offloaded")
    assert cluster.d_sched.placement.stats.refused == 1
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"offload_ratio": 1.0, "decode_tokens": 96}], indirect=True)
def test_retraction_spares_offloaded_requests(cluster, model):
    """A local request short of pages retracts local ones only: an offloaded request holds no page
    here, so retracting it frees nothing, throws its executor KV away and makes it wait to be
    recomputed here, in the very pool that is short."""
    ids = random_prompts(8, 512, [20, 28, 12, 36], seed=5)
    reqs = [cluster.add(f"r{i}", x, 40, room=i)[1] for i, x in enumerate(ids)]
    cluster.run(lambda: finished(*reqs))
    outs = Engine(model, **ENGINE_ARGS).generate(input_ids=ids, sampling_params=[params(40)] * 8)
    assert [r.output_ids for r in reqs] == [o["output_ids"] for o in outs]
    assert cluster.d_sched.stats.retractions > 0  # the local pool was short
    offloaded = [r for r in reqs if r.extra.get("attention_offloaded")]
    assert offloaded and not [r.rid for r in offloaded if r.retractions]
    assert cluster.d_sched.placement.stats.fallbacks == 0
    cluster.assert_clean()


@pytest.mark.parametrize(
    "cluster",
    [{"offload_ratio": float("inf"), "offload_timeout": 1.0, "exchange": x} for x in ("tcp", "shm")],
    indirect=True,
)
def test_executor_death_recomputes_here(cluster, want):
    ids = prompts(2, seed=3)
    reqs = [cluster.add(f"r{i}", x, N, room=i)[1] for i, x in enumerate(ids)]
    cluster.run(lambda: all(len(r.output_ids) >= 3 for r in reqs))
    cluster.stop_executor()
    cluster.run(lambda: finished(*reqs))
    assert [r.output_ids for r in reqs] == want(ids)
    manager = cluster.d_sched.placement
    assert manager.stats.fallbacks == 2 and manager.homes == {}
    assert cluster.p_sched.allocator.num_used == 0 and cluster.d_sched.allocator.num_used == 0


def test_restarted_prefill_instance(cluster, want):
    """A room asked of the old incarnation fails at once when the new one registers (not after
    --pd-timeout, 60 s here) and frees its pages; the first request after the restart is served."""
    old = cluster.add("old", prompts(1)[0], N, room=0, side="decode")[1]
    cluster.run(lambda: cluster.decode.inbound[0].peer is not None)
    cluster.decode.directory.refresh()  # the watcher saw the old incarnation alive after the ask
    cluster.restart_prefill()
    cluster.decode.directory.refresh()
    ids = prompts(1, seed=4)
    new = cluster.add("new", ids[0], N, room=1)[1]
    cluster.run(lambda: finished(old, new), limit_s=30)
    assert old.finished_reason["status_code"] == 502 and "restarted" in message(old)
    assert [new.output_ids] == want(ids)
    cluster.assert_clean()


def test_request_racing_a_restart_is_asked_again(cluster, want):
    """Asked of the old address after the old incarnation last answered: the new one serves it."""
    ids = prompts(1, seed=5)
    cluster.restart_prefill()  # not yet seen by the decode side's directory
    new = cluster.add("new", ids[0], N, room=1)[1]
    cluster.run(lambda: cluster.decode.inbound[1].peer is not None)
    cluster.decode.directory.refresh()
    cluster.run(lambda: finished(new), limit_s=30)
    assert [new.output_ids] == want(ids)
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"offload_ratio": float("inf"), "offload_timeout": 2.0}], indirect=True)
def test_executor_death_and_respawn(cluster, want, monkeypatch):
    """The prefill side reaps a dead executor at once (offload asks refused meanwhile), starts a new
    one after its backoff, and offloading resumes there; the decode side drops the dead one's page
    counts; in-flight offloaded requests are recomputed here."""
    monkeypatch.setattr(supervisor_module, "BACKOFF_S", (0.2,))
    link = cluster.prefill.executor
    keeper = ExecutorSupervisor(cluster.start_executor, cluster.proc, link)
    old = link.address
    ids = prompts(3, seed=6)
    first = cluster.add("first", ids[0], N, room=0)[1]
    cluster.run(lambda: len(first.output_ids) >= 3)
    cluster.stop_executor()
    cluster.prefill.tick()
    assert link.down and keeper.proc is None  # seen and reaped on the next iteration
    during = cluster.add("during", ids[1], N, room=1)[1]
    cluster.run(lambda: finished(first, during) and not link.down, limit_s=60)
    assert link.address != old and link.restarts == 1
    after = cluster.add("after", ids[2], N, room=2)[1]
    cluster.run(lambda: finished(after))
    assert [r.output_ids for r in (first, during, after)] == want(ids)
    assert after.extra.get("attention_offloaded") and cluster.d_sched.placement.stats.fallbacks >= 1
    assert set(cluster.d_sched.placement.info()["executors"]) == {link.address}
    cluster.assert_clean()


@pytest.mark.parametrize(
    "cluster", [{"pd_timeout": 1.0}, {"pd_timeout": 1.0, "offload_ratio": float("inf")}], indirect=True
)
def test_the_prefill_reply_leaves_with_its_kv_not_after_the_ack(cluster, want):
    """The router forwards the decode side's stream only after the prefill's reply, and an ack
    reaches the prefill loop only between its forwards: the reply leaves with the KVDone. An ack
    that never comes ends the transfer there after the timeout, with no second reply and no cancel
    of a decode side that has its KV."""
    ids = prompts(1)[0]
    cluster.net.hold_kinds = {"KVAck"}
    p, d = cluster.add("r", ids, N, room=3)
    cluster.run(lambda: bool(cluster.net.held))
    assert cluster.emitted["prefill"] == [p] and p.finished_reason["type"] == "length"
    assert 3 in cluster.prefill.out  # still its transfer until acknowledged
    cluster.net.release()
    cluster.run(lambda: finished(d) and cluster.idle())
    assert d.output_ids == want([ids])[0] and cluster.prefill.stats.transfers == 1
    cluster.assert_clean()

    cluster.net.hold_kinds = {"KVAck"}
    p, d = cluster.add("s", ids, N, room=4)
    cluster.run(lambda: bool(cluster.net.held))
    cluster.net.held.clear()  # lost: the prefill side times out waiting for it
    cluster.net.hold_kinds = set()
    cluster.run(lambda: finished(d) and cluster.idle())
    assert cluster.emitted["prefill"].count(p) == 1 and p.finished_reason["type"] == "length"
    assert d.output_ids == want([ids])[0] and cluster.prefill.stats.failures == 1
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"pd_timeout": 0.5}, mooncake(pd_timeout=0.5)], indirect=True)
def test_silent_prefill_instance_times_out(cluster):
    cluster.net.cut(cluster.prefill.transport.address)
    d = cluster.add("r", prompts(1)[0], N, room=1, side="decode")[1]
    cluster.run(lambda: finished(d), decode=True)
    assert d.finished_reason["status_code"] == 504 and "no KV from the prefill instance" in message(d)
    assert cluster.decode.stats.failures == 1
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"pd_timeout": 0.5}], indirect=True)
def test_unclaimed_kv_times_out(cluster):
    """A prefill whose decode side never asks frees everything after the timeout."""
    p = cluster.add("r", prompts(1)[0], N, room=1, side="prefill")[0]
    cluster.run(lambda: finished(p) and not cluster.prefill.out, decode=False)
    assert p.finished_reason["status_code"] == 504
    cluster.assert_clean()


def _queued(c: Cluster, p, d) -> None:
    c.iterate(decode=False)
    assert d in c.d_sched.waiting


def _kv_in_flight(c: Cluster, p, d) -> None:
    c.net.hold_kinds = {"KVPages", "KVDone"}
    c.run(lambda: d in c.d_sched.arriving and c.prefill.out[d.bootstrap.room].sent > 0)


def _prefilled(c: Cluster, p, d) -> None:
    c.net.hold_kinds = {"KVDone"}
    c.run(lambda: bool(c.net.held))
    assert d in c.d_sched.arriving and p.finished


def _decoding(c: Cluster, p, d) -> None:
    c.run(lambda: len(d.output_ids) >= 3)
    assert d in c.d_sched.running


STATES = {"queued": _queued, "kv in flight": _kv_in_flight, "prefilled": _prefilled, "decoding": _decoding}


@pytest.mark.parametrize(
    "cluster",
    [{"prefill_chunk": 8}, {"prefill_chunk": 8, "offload_ratio": float("inf")}, mooncake(prefill_chunk=8)],
    ids=["local", "offloaded", "mooncake"],
    indirect=True,
)
@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_abort_in_every_state(cluster, state, side):
    """An abort on either side, in every state, ends the request on both and frees everything.
    Once the prefill side has replied (with its KVDone) its part is over: only the decode side's
    is left. Pages in flight come before the reply, except offloaded (the last chunk is computed
    before the executor grants its pages)."""
    p, d = cluster.add("r", prompts(3, seed=4)[2], 40, room=9)  # 30 tokens: 4 chunks of 8
    STATES[state](cluster, p, d)
    replied = p in cluster.emitted["prefill"]
    offloaded = cluster.executor is not None
    assert replied == (state in ("prefilled", "decoding")) or (state == "kv in flight" and offloaded)
    cluster.abort(side, "r")
    cluster.net.release()
    cluster.run(lambda: finished(p, d) and cluster.idle())
    if replied:
        assert p.finished_reason["type"] == "length"
        assert d.finished_reason["type"] == ("abort" if side == "decode" else "length")
    else:  # the other side learns of it at once
        assert (d if side == "decode" else p) in cluster.emitted[side]
        assert p.finished_reason["type"] == d.finished_reason["type"] == "abort"
        if side == "decode" and state == "queued":  # told, not left waiting for the ask until --pd-timeout
            assert "cancelled" in message(p), message(p)
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [mooncake()], indirect=True)
def test_one_sided_abort_fences_pages_until_the_writer_stops(cluster):
    """Pages a one-sided writer may still hit stay out of use until it says it stopped."""
    p, d = cluster.add("r", prompts(1, seed=4)[0], 40, room=9)
    _prefilled(cluster, p, d)
    pages = list(d.pages)
    cluster.abort("decode", "r")
    assert cluster.decode.fences == {9: (pages, cluster.decode.fences[9][1])}
    assert cluster.d_sched.allocator.num_used == len(pages)  # held, though the request ended
    cluster.net.release()
    cluster.run(lambda: not cluster.decode.fences, limit_s=30)  # the writer's fence, not the 60 s timeout
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [mooncake()], indirect=True)
def test_dead_decode_instance_seen_by_the_writer(cluster, monkeypatch):
    """A write the engine fails (the decode instance died) ends the request on both sides at once."""

    def dead(*args, **kwargs):
        raise TransportError("Mooncake write of 1 bytes to 127.0.0.1:1 failed")

    monkeypatch.setattr(cluster.movers[0].plane.engine, "write", dead)
    p, d = cluster.add("r", prompts(1)[0], N, room=4)
    cluster.run(lambda: finished(p, d))
    assert p.finished_reason["status_code"] == 502 and "not sent" in message(p)
    assert "not sent" in message(d) and cluster.movers[0].sessions == {}  # it must ask again
    cluster.assert_clean()


@pytest.mark.parametrize("cluster", [{"decode_tokens": 64}], indirect=True)
@pytest.mark.parametrize("first", ["decode", "prefill"])
def test_a_request_the_decode_side_refuses_ends_at_once_on_the_prefill_side(cluster, first):
    """A prompt longer than the decode instance can ever hold is a client error there (400). Its
    prefill instance, which has it or is about to, is told at once instead of holding its KV
    (and the router's reply) until --pd-timeout; nothing is computed for a refusal that came first."""
    ids = [(7 * i) % 500 + 1 for i in range(70)]
    assert len(ids) >= 64
    second = "prefill" if first == "decode" else "decode"

    def add(side: str):
        if side == "decode":
            with pytest.raises(ValueError, match="this server accepts at most 63"):
                cluster.add("r", ids, N, room=5, side="decode")
            return None
        return cluster.add("r", ids, N, room=5, side="prefill")[0]

    forwards = cluster.p_sched.stats.forward_passes
    p = add(first)
    cluster.iterate(decode=False)  # messages sent so far are handled
    p = add(second) or p
    cluster.run(lambda: finished(p) and not cluster.prefill.out, limit_s=10)
    assert p.finished_reason["type"] == "abort" and "refused by the decode instance" in message(p)
    assert p in cluster.emitted["prefill"]
    if first == "decode":
        assert p.finished_reason["status_code"] == 400 and cluster.p_sched.stats.forward_passes == forwards
    assert not cluster.prefill.refused and not cluster.prefill.out
    cluster.assert_clean()
